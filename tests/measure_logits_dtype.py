"""Prints what bfloat16 logits cost in accuracy (BENCHMARKS.md): `PYTHONPATH=. python tests/measure_logits_dtype.py`.

One train-mode loss and gradient of PSPNet-50 (150 classes, 2 images of 129x129,
labels with an ignored band) for the same weights: float32 compute, then bfloat16
compute with float32 and with bfloat16 logits (model.logits_dtype).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import losses
from pspnet_jax.models.pspnet import PSPNet

rs = np.random.RandomState(0)
images = jnp.asarray(rs.randn(2, 129, 129, 3), jnp.float32)
labels = rs.randint(0, 150, (2, 129, 129))
labels[:, :20] = 255
labels = jnp.asarray(labels)
variables = nnx.state(PSPNet(150, backbone='resnet50', rngs=nnx.Rngs(0)))


def loss_and_gradient(dtype, logits_dtype):
  model = PSPNet(150, backbone='resnet50', dropout=0.0, dtype=dtype, logits_dtype=logits_dtype,
                 rngs=nnx.Rngs(0))
  nnx.update(model, variables)
  model.train()

  def loss_fn(model):
    logits, aux = model(images, return_aux=True)
    return losses.pspnet_loss(logits, aux, labels, aux_weight=0.4)[0]

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)


relative_l2 = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
loss32, grad32 = loss_and_gradient(jnp.float32, jnp.float32)
loss_a, grad_a = loss_and_gradient(jnp.bfloat16, jnp.float32)
loss_b, grad_b = loss_and_gradient(jnp.bfloat16, jnp.bfloat16)
print(f'float32 compute: loss {loss32:.6f}')
for name, loss, grad in (('bf16 compute, f32 logits', loss_a, grad_a),
                         ('bf16 compute, bf16 logits', loss_b, grad_b)):
  print(f'{name}: loss relative diff {abs(loss - loss32) / loss32:.2e}, '
        f'gradient relative L2 vs float32 compute {relative_l2(grad, grad32):.3f}')
print(f'bf16 logits vs f32 logits (both bf16 compute): gradient relative L2 '
      f'{relative_l2(grad_b, grad_a):.4f}')
