"""Ignore-aware pixel cross-entropy and the PSPNet total loss (main + aux_weight * aux)."""

import jax
import jax.numpy as jnp

from pspnet_jax.models.layers import accumulation_dtype


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """Mean cross-entropy over the pixels whose label is not `ignore_label` (nn.CrossEntropyLoss).

  logits (..., classes), labels (...) integer. A batch with no valid pixel
  gives 0 (PyTorch gives NaN), so an all-ignore crop cannot poison training.
  Labels must be in [0, classes) or `ignore_label`; the loader checks that.
  """
  valid = labels != ignore_label
  log_probs = jax.nn.log_softmax(logits.astype(accumulation_dtype(logits.dtype)), axis=-1)
  safe_labels = jnp.where(valid, labels, 0)[..., None]
  nll = -jnp.take_along_axis(log_probs, safe_labels, axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def pspnet_loss(logits, aux_logits, labels, *, aux_weight: float, ignore_label: int = 255):
  """The official total loss; returns (total, {'main_loss', 'aux_loss'})."""
  main = cross_entropy(logits, labels, ignore_label)
  aux = cross_entropy(aux_logits, labels, ignore_label)
  return main + aux_weight * aux, {'main_loss': main, 'aux_loss': aux}
