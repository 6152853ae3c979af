"""Latency of the deployable exports beside the JAX model, on the same images in one run.

`measure_deploy(config, batch_size, steps)`: the config's model (random
weights; speed does not depend on them) at crop_size x crop_size, exported in
memory to each format of `deploy` that runs in this process (ONNX Runtime,
TF SavedModel, the TFLite interpreter) and timed as its runtime runs it, with
the jitted JAX forward: median seconds per call of `batch_size` images over
`steps` calls after a warm-up call, and each format's largest logit
difference from JAX relative to JAX's largest logit. ONNX Runtime and TFLite
use their defaults (all cores, XNNPACK for TFLite).
"""

import os
import tempfile

import jax
import numpy as np
from flax import nnx

from pspnet_jax import deploy
from pspnet_jax.benchmarks.timing import median_seconds
from pspnet_jax.models import create_model


def _onnx_runner(serving, size):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(deploy.onnx_model(serving, size).SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return lambda images: session.run(['logits'], {'images': images})[0]


def _savedmodel_runner(serving, size, scratch):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = os.path.join(scratch, 'savedmodel')
  deploy.export_savedmodel(serving, path, size)
  serve = tf.saved_model.load(path).signatures['serving_default']
  return lambda images: serve(images=tf.constant(images))['logits'].numpy()


def _tflite_runner(serving, size, batch_size):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  interpreter = tf.lite.Interpreter(model_content=deploy.tflite_model(serving, size))
  source, = interpreter.get_input_details()
  interpreter.resize_tensor_input(source['index'], [batch_size, *size, 3])
  interpreter.allocate_tensors()
  target = interpreter.get_output_details()[0]['index']

  def run(images):
    interpreter.set_tensor(source['index'], images)
    interpreter.invoke()
    return interpreter.get_tensor(target)

  return run


def measure_deploy(config, batch_size: int, steps: int) -> dict:
  model = create_model(config, rngs=nnx.Rngs(config.seed))
  model.eval()
  size = deploy.export_size(config, None)
  serving = deploy.serving_function(model)
  images = np.random.RandomState(0).randn(batch_size, *size, 3).astype(np.float32)
  jitted = jax.jit(serving.fn)
  runners = {'jax': lambda x: np.asarray(jax.block_until_ready(jitted(x)))}
  with tempfile.TemporaryDirectory() as scratch:
    runners['onnxruntime'] = _onnx_runner(serving, size)
    runners['tf_savedmodel'] = _savedmodel_runner(serving, size, scratch)
    runners['tflite'] = _tflite_runner(serving, size, batch_size)
    reference = runners['jax'](images)
    result = {'what': 'deploy', 'backbone': config.model.backbone, 'size': list(size),
              'classes': config.data.num_classes, 'batch_size': batch_size, 'steps': steps}
    for name, run in runners.items():
      result[f'{name}_seconds'] = round(median_seconds(lambda run=run: run(images), steps), 4)
      result[f'{name}_max_relative_diff'] = float(
          np.max(np.abs(run(images) - reference)) / np.max(np.abs(reference)))
  return result
