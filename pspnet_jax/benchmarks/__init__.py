"""What `python -m pspnet_jax.benchmark` measures, as a flag-free library.

timing: wall-clock medians and CPU seconds (Grain's worker processes included).
model_speed: the forward and the training step of the model, FLOPs and MFU,
  beside the PyTorch reference.
input_speed: the augmented-image rate of the Grain loader, beside the semseg way.
eval_speed: the slide protocol's images and windows per second, beside semseg's tool/test.py way.
fake_ade20k: ADE20K-sized files in the official layout, built with the real builder.
"""
