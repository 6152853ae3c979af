"""The training losses: PSPNet's (ignore-aware pixel cross-entropy, main + aux_weight * aux)
and CascadePSP's refinement loss (`refinement_loss`: cross-entropy, L1, L2 and a Sobel-gradient
term over the refinement module's six outputs).

Two normalizations of the summed pixel losses (`model.loss_normalizer`):
'valid' divides by the labelled pixels (semseg's nn.CrossEntropyLoss(ignore_index)),
'all' by every pixel of the batch, ignored ones included (mmsegmentation's
CrossEntropyLoss with its default avg_non_ignore=False).
"""

import jax
import jax.numpy as jnp

from pspnet_jax.models.layers import accumulation_dtype


LOSS_NORMALIZERS = ('valid', 'all')


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255,
                  normalizer: str = 'valid') -> jax.Array:
  """Cross-entropy summed over the pixels whose label is not `ignore_label`, divided by their
  number (normalizer 'valid', nn.CrossEntropyLoss) or by all pixels ('all', mmseg).

  logits (..., classes), labels (...) integer. A batch with no valid pixel
  gives 0 (PyTorch gives NaN), so an all-ignore crop cannot poison training.
  Labels must be in [0, classes) or `ignore_label`; the loader checks that.
  """
  valid = labels != ignore_label
  log_probs = jax.nn.log_softmax(logits.astype(accumulation_dtype(logits.dtype)), axis=-1)
  safe_labels = jnp.where(valid, labels, 0)[..., None]
  nll = -jnp.take_along_axis(log_probs, safe_labels, axis=-1)[..., 0]
  count = jnp.sum(valid) if normalizer == 'valid' else labels.size
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def pspnet_loss(logits, aux_logits, labels, *, aux_weight: float, ignore_label: int = 255,
                normalizer: str = 'valid'):
  """The official total loss; returns (total, {'main_loss', 'aux_loss'})."""
  main = cross_entropy(logits, labels, ignore_label, normalizer)
  aux = cross_entropy(aux_logits, labels, ignore_label, normalizer)
  return main + aux_weight * aux, {'main_loss': main, 'aux_loss': aux}


# The refinement module's outputs in the official loss order (CascadePSP's
# util/metrics_compute.py): index i takes ce_weights[i], l1_weights[i], l2_weights[i].
REFINEMENT_OUTPUTS = ('224', '28', '56', '28_2', '28_3', '56_2')
# sqrt(gx^2 + gy^2 + eps) of the official SobelOperator(1e-4).
_SOBEL_EPSILON = 1e-4


def sobel_magnitude(x: jax.Array) -> jax.Array:
  """CascadePSP's SobelOperator on NHWC single-channel `x`: a 3x3 box mean (zero padding,
  always divided by 9, avg_pool2d's count_include_pad), then the Sobel pair divided by 4 (zero
  padding), then sqrt(gx^2 + gy^2 + 1e-4)."""
  padded = jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
  height, width = x.shape[1:3]
  window = lambda dy, dx, image: image[:, dy:dy + height, dx:dx + width]
  smooth = sum(window(dy, dx, padded) for dy in range(3) for dx in range(3)) / 9.0
  smooth = jnp.pad(smooth, ((0, 0), (1, 1), (1, 1)))
  # Cross-correlation with [[1,0,-1],[2,0,-2],[1,0,-1]] / 4 and its transpose (PyTorch convs).
  weights = (1.0, 2.0, 1.0)
  grad_x = sum(w * (window(dy, 0, smooth) - window(dy, 2, smooth))
               for dy, w in enumerate(weights)) / 4.0
  grad_y = sum(w * (window(0, dx, smooth) - window(2, dx, smooth))
               for dx, w in enumerate(weights)) / 4.0
  return jnp.sqrt(grad_x**2 + grad_y**2 + _SOBEL_EPSILON)[..., None]


def _binary_cross_entropy_with_logits(logits, targets):
  """Mean of F.binary_cross_entropy_with_logits: max(x, 0) - x t + log(1 + exp(-|x|))."""
  return jnp.mean(jax.nn.relu(logits) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def refinement_loss(outputs: dict, gt: jax.Array, *, ce_weights, l1_weights, l2_weights,
                    grad_weight: float):
  """CascadePSP's training loss (compute_loss_and_metrics with its defaults' structure).

  `outputs`: the refinement module's dict in training (every 'out_<s>' logit map and its
  'pred_<s>' sigmoid, s in REFINEMENT_OUTPUTS), NHW1; `gt` the float ground truth in [0, 1],
  NHW1. Per output s: binary cross-entropy of out_s against gt > 0.5, L1 and squared error of
  pred_s against gt, each a mean over all pixels, weighted by the output's entry of the
  three weight lists; the finest output adds grad_weight times the L1 distance between the
  Sobel magnitudes of gt and pred_224. Returns (total, {'ce_loss', 'l1_loss', 'l2_loss',
  'grad_loss'}) with the weighted sums of each kind.
  """
  dtype = accumulation_dtype(outputs['out_224'].dtype)   # float32, float64 for float64
  gt = gt.astype(dtype)
  hard = (gt > 0.5).astype(dtype)
  parts = {'ce_loss': 0.0, 'l1_loss': 0.0, 'l2_loss': 0.0}
  for index, name in enumerate(REFINEMENT_OUTPUTS):
    logits = outputs[f'out_{name}'].astype(dtype)
    pred = outputs[f'pred_{name}'].astype(dtype)
    parts['ce_loss'] += ce_weights[index] * _binary_cross_entropy_with_logits(logits, hard)
    parts['l1_loss'] += l1_weights[index] * jnp.mean(jnp.abs(pred - gt))
    parts['l2_loss'] += l2_weights[index] * jnp.mean(jnp.square(pred - gt))
  parts['grad_loss'] = jnp.mean(jnp.abs(sobel_magnitude(gt) - sobel_magnitude(
      outputs['pred_224'].astype(dtype))))
  total = parts['ce_loss'] + parts['l1_loss'] + parts['l2_loss'] + grad_weight * parts[
      'grad_loss']
  return total, parts
