"""Cross-entropy with ignore label against nn.CrossEntropyLoss; the all-ignore batch."""

import jax.numpy as jnp
import numpy as np
import torch

from pspnet_jax import losses


def test_cross_entropy_matches_torch_with_ignored_pixels():
  rs = np.random.RandomState(0)
  logits = rs.randn(2, 9, 7, 5).astype(np.float32) * 3
  labels = rs.randint(0, 5, (2, 9, 7))
  labels[0, :4] = 255
  expected = torch.nn.CrossEntropyLoss(ignore_index=255)(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             expected.item(), rtol=1e-6)


def test_total_loss_is_main_plus_weighted_aux():
  rs = np.random.RandomState(1)
  main, aux = rs.randn(2, 4, 4, 3).astype(np.float32), rs.randn(2, 4, 4, 3).astype(np.float32)
  labels = rs.randint(0, 3, (2, 4, 4))
  total, parts = losses.pspnet_loss(main, aux, labels, aux_weight=0.4)
  ce = torch.nn.CrossEntropyLoss(ignore_index=255)
  to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  expected_main = ce(to_torch(main), torch.from_numpy(labels)).item()
  expected_aux = ce(to_torch(aux), torch.from_numpy(labels)).item()
  np.testing.assert_allclose(parts['main_loss'], expected_main, rtol=1e-6)
  np.testing.assert_allclose(parts['aux_loss'], expected_aux, rtol=1e-6)
  np.testing.assert_allclose(total, expected_main + 0.4 * expected_aux, rtol=1e-6)


def test_all_ignore_batch_gives_zero_not_nan():
  logits = jnp.ones((1, 3, 3, 4))
  labels = jnp.full((1, 3, 3), 255)
  assert float(losses.cross_entropy(logits, labels)) == 0.0


def test_all_pixels_normalizer_is_mmseg_cross_entropy():
  # mmseg 1.2.2 CrossEntropyLoss(avg_non_ignore=False): F.cross_entropy(reduction='none')
  # summed and divided by label.numel() (+ float32 eps), ignored pixels included.
  rs = np.random.RandomState(2)
  logits = rs.randn(2, 6, 5, 4).astype(np.float32) * 2
  labels = rs.randint(0, 4, (2, 6, 5))
  labels[1, :3] = 255
  pixel_losses = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels),
      reduction='none', ignore_index=255)
  expected = pixel_losses.sum() / (labels.size + torch.finfo(torch.float32).eps)
  np.testing.assert_allclose(
      losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), normalizer='all'),
      expected.item(), rtol=1e-6)
