"""Prints the measured Flax-vs-twin differences quoted in notes: `PYTHONPATH=. python tests/measure_parity.py`.

The tests assert bounds; this shows the actual numbers (eval logits, bfloat16 agreement).
"""

import conftest  # 8 CPU devices, tests folder importable
import numpy as np, torch, jax.numpy as jnp
from flax import nnx
from parity import forward, make_twins, max_relative_diff, nchw, nhwc
from pspnet_jax import checkpoint
from pspnet_jax.models.pspnet import PSPNet
for depth, classes, size, kw in [(50,150,(233,233),{}),(50,150,(200,300),{}),(18,21,(97,129),{'output_stride':8}),(18,21,(97,129),{'output_stride':16})]:
  twin, model = make_twins(depth, classes, **kw); model.eval()
  x = np.random.RandomState(0).randn(2 if depth == 18 else 1, *size, 3).astype(np.float32)
  with torch.no_grad(): e = nhwc(twin(nchw(x)))
  a = np.asarray(forward(model, x))
  print(depth, size, kw, 'maxabs', np.abs(a-e).max(), 'max|logit|', np.abs(e).max(), 'rel', max_relative_diff(a, e))
_, model = make_twins(50, 21); model.eval()
m16 = PSPNet(21, backbone='resnet50', dtype=jnp.bfloat16, rngs=nnx.Rngs(1)); nnx.update(m16, checkpoint.model_variables(model)); m16.eval()
x = np.random.RandomState(2).randn(1, 129, 161, 3).astype(np.float32)
print('bf16 agreement', float(jnp.mean(jnp.argmax(forward(m16, x), -1) == jnp.argmax(forward(model, x), -1))))
