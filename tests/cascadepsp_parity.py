"""The official refinement module with random weights, shared by the CascadePSP tests."""

import torch

import cascadepsp_reference as ref


def random_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
  """`module` with every BatchNorm's statistics and affine parameters randomized around the
  identity and distinct batch counts, in eval mode.

  Not parity.randomize_batch_norms' statistics calibrated on a batch: with them eval mode
  amplifies input changes so much (the exploding sensitivity of batch-normalized random
  networks) that over the refinement module's three passes float32 rounding alone moves
  out_224 by 2e-2, the official module's own float32 against its float64 as much as ours.
  """
  batch_norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for index, bn in enumerate(batch_norms):
      bn.running_mean.normal_(0.0, 0.1)
      bn.running_var.uniform_(0.5, 1.5)
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
      bn.num_batches_tracked.fill_(1000 + index)
  return module.eval()


def random_official(seed: int) -> torch.nn.Module:
  """The official RefinementModule: its own random initialization, then `random_batch_norms`."""
  torch.manual_seed(seed)
  return random_batch_norms(ref.RefinementModule())
