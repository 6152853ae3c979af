"""Ignore-aware pixel cross-entropy and the PSPNet total loss (main + aux_weight * aux).

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
