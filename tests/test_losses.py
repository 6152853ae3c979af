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


def _official_refinement_loss(images, para):
  """CascadePSP's SobelComputer + compute_loss_and_metrics (util/metrics_compute.py,
  models/sobel_op.py), transcribed on torch's CPU: the loss part with has_lower_res=True."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def sobel(x):
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
    kx = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=x.dtype)[None, None] / 4
    ky = torch.tensor([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=x.dtype)[None, None] / 4
    return torch.sqrt(F.conv2d(x, kx, padding=1) ** 2 + F.conv2d(x, ky, padding=1) ** 2 + 1e-4)

  gt = images['gt']
  sizes = ['224', '28', '56', '28_2', '28_3', '56_2']
  ce = [F.binary_cross_entropy_with_logits(images[f'out_{s}'], (gt > 0.5).float())
        for s in sizes]
  l1 = [F.l1_loss(images[f'pred_{s}'], gt) for s in sizes]
  l2 = [F.mse_loss(images[f'pred_{s}'], gt) for s in sizes]
  grad_loss = F.l1_loss(sobel(gt), sobel(images['pred_224']))
  loss = [ce[i] * para['ce_weight'][i] + l1[i] * para['l1_weight'][i] +
          l2[i] * para['l2_weight'][i] for i in range(6)]
  loss[0] = loss[0] + grad_loss * para['grad_weight']
  return sum(loss), grad_loss


def test_refinement_loss_equals_the_official_compute_loss_and_metrics():
  rs = np.random.RandomState(3)
  shape = (2, 1, 24, 32)
  outputs = {f'out_{s}': torch.tensor(rs.randn(*shape).astype(np.float32) * 3)
             for s in losses.REFINEMENT_OUTPUTS}
  outputs.update({f'pred_{s}': torch.sigmoid(outputs[f'out_{s}'])
                  for s in losses.REFINEMENT_OUTPUTS})
  # A soft-edged ground truth (the official masks are 0..255 grey levels / 255).
  gt = torch.tensor(np.clip(rs.rand(*shape) * 1.6 - 0.3, 0, 1).astype(np.float32))
  para = {'ce_weight': [0.0, 1.0, 0.5, 1.0, 1.0, 0.5], 'l1_weight': [1.0, 0.0, 0.25, 0.0, 0.0, 0.25],
          'l2_weight': [1.0, 0.0, 0.25, 0.0, 0.0, 0.25], 'grad_weight': 5.0}
  expected, expected_grad = _official_refinement_loss({**outputs, 'gt': gt}, para)
  nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))
  total, parts = losses.refinement_loss(
      {key: nhwc(value) for key, value in outputs.items()}, nhwc(gt),
      ce_weights=para['ce_weight'], l1_weights=para['l1_weight'], l2_weights=para['l2_weight'],
      grad_weight=para['grad_weight'])
  np.testing.assert_allclose(float(parts['grad_loss']), float(expected_grad), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-5)
