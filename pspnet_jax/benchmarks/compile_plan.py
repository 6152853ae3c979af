"""Ahead-of-time plan of the training step for a TPU topology, compiled on a CPU host.

`plan(config, 'v5e:2x4')` compiles the real train step of train.py (and the
eval step of evaluation.py) for the chips of a TPU slice that this host does
not have: `jax.experimental.topologies` describes the slice's devices, and
libtpu (the `jax[tpu]` extra, requirements-tpu-plan.txt) compiles for them,
as MaxText's train_compile.py does. The state and the batch are shapes only
(`train_state.abstract_train_state`, `train.abstract_batch`); nothing is
allocated or run. From the compiled program, per device and per step:

- memory (XLA's memory analysis): arguments (parameters, optimizer state,
  BatchNorm statistics and this device's share of the batch), outputs,
  temporaries and the peak of live buffers, against the chip's HBM (`fits`);
- flops and bytes_accessed (XLA's cost analysis of the partitioned program);
- the roofline: a step takes at least max(flops / peak FLOP/s, bytes /
  HBM bandwidth), and roofline_mfu = (flops / peak FLOP/s) / that bound is the
  best model-FLOP utilization the step allows;
- collectives (`collective_counts`).

Per device is per chip: v4 and v5p are planned as megacore chips (one device
of two TensorCores), as JAX runs them by default.
"""

import os
import re
import time
from typing import NamedTuple

from pspnet_jax import evaluation, optim, sharding, train, train_state
from pspnet_jax.data import pipeline

GiB = 2**30


class Chip(NamedTuple):
  peak_flops: float     # dense bfloat16 FLOP/s of one chip
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  megacore: bool        # two TensorCores that JAX drives as one device


# By jax device_kind. Peak bf16 compute, HBM capacity and bandwidth per chip from Google's
# "System architecture" tables (read 2026-11-23): https://cloud.google.com/tpu/docs/v4,
# https://cloud.google.com/tpu/docs/v5e, https://cloud.google.com/tpu/docs/v5p,
# https://cloud.google.com/tpu/docs/v6e. The v4 and v5p pages give capacities in GiB; the
# v5e and v6e pages say "16 GB" and "32 GB" of HBM stacks, which are binary sizes too.
# The v6e page's older revision rounds the bandwidths to 800 (v5e) and 1600 GB/s (v6e).
TPU_CHIPS = {
    'TPU v4': Chip(peak_flops=275e12, hbm_bytes=32 * GiB, hbm_bandwidth=1200e9, megacore=True),
    'TPU v5 lite': Chip(peak_flops=197e12, hbm_bytes=16 * GiB, hbm_bandwidth=819e9,
                        megacore=False),                                         # v5e
    'TPU v5': Chip(peak_flops=459e12, hbm_bytes=95 * GiB, hbm_bandwidth=2765e9,
                   megacore=True),                                               # v5p
    'TPU v6 lite': Chip(peak_flops=918e12, hbm_bytes=32 * GiB, hbm_bandwidth=1640e9,
                        megacore=False),                                         # v6e
}
# The topology names' chip prefixes (as in get_topology_desc) -> device_kind.
_TOPOLOGY_CHIPS = {'v4': 'TPU v4', 'v5e': 'TPU v5 lite', 'v5p': 'TPU v5', 'v6e': 'TPU v6 lite'}

# An HLO instruction whose opcode is a collective: `%name = shape all-reduce(operands), ...`.
# Asynchronous ones are split into -start and -done: the start is counted.
_COLLECTIVE = re.compile(
    r'\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(')


def topology_devices(topology: str) -> list:
  """The compile-only devices of a TPU slice, e.g. 'v5e:2x4' (8 chips) or 'v4:2x2x1'.

  Needs libtpu; works on a host without TPUs. The environment lets libtpu
  load beside another process's (a TPU VM in training) and skips the
  metadata server, which a host without TPUs has no TPU answers for.
  """
  version = topology.split(':')[0]
  if version not in _TOPOLOGY_CHIPS:
    raise ValueError(f'--topology={topology!r}: expected <chip>:<shape> with chip one of '
                     f'{sorted(_TOPOLOGY_CHIPS)}, e.g. v5e:2x4')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  chip_config = {'chip_config_name': 'megacore'} if TPU_CHIPS[_TOPOLOGY_CHIPS[version]].megacore \
      else {}
  return list(topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                           **chip_config).devices)


def collective_counts(hlo_text: str) -> dict:
  """Collective instructions in the text of an optimized HLO module, by kind.

  A static count: an instruction in a loop body counts once, an asynchronous
  pair (-start, -done) once, and an all-reduce of a tuple (XLA's combiner
  merges many small ones, e.g. the BatchNorm statistics or the gradients)
  once however many arrays it carries.
  """
  found = _COLLECTIVE.findall(hlo_text)
  return {f'{kind.replace("-", "_")}s': found.count(kind) for kind in
          ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')}


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict:
  """The lower bound of a step's time from compute and from HBM traffic, and the MFU it allows."""
  compute_seconds = flops / chip.peak_flops
  memory_seconds = bytes_accessed / chip.hbm_bandwidth
  bound_seconds = max(compute_seconds, memory_seconds)
  return {'compute_seconds': compute_seconds, 'memory_seconds': memory_seconds,
          'roofline_seconds': bound_seconds,
          'bound': 'compute' if compute_seconds >= memory_seconds else 'memory',
          'roofline_mfu': compute_seconds / bound_seconds if bound_seconds else None}


def step_report(compiled, chip: Chip) -> dict:
  """Memory, cost, fit, roofline and collectives of one compiled step, per device."""
  costs = train.compiled_costs(compiled)
  return {**costs, 'hbm_bytes': chip.hbm_bytes, 'fits': costs['peak_bytes'] <= chip.hbm_bytes,
          **roofline(costs['flops'], costs['bytes_accessed'], chip),
          **collective_counts(compiled.as_text())}


def plan(config, topology: str, batch_size: int | None = None, *,
         eval_step: bool = True) -> dict:
  """The train step (global batch `batch_size`, default train.batch_size) compiled for
  `topology`: the step_report keys, per device and per step, plus what was planned and the
  compile time. With eval_step, the same for the eval step (eval.batch_size crops), as
  eval_<key>."""
  train.validate(config)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(devices)
  batch_size = batch_size or config.train.batch_size
  sharding.local_batch_size(batch_size, mesh)
  chip = TPU_CHIPS[devices[0].device_kind]
  # The schedule's length does not change what a step computes.
  num_steps = max(config.train.num_steps, 1)
  tx = optim.create_optimizer(config.optim, num_steps, batch_size)
  graphdef, eval_graphdef = train_state.graphdefs(config)
  state = train_state.abstract_train_state(config, tx, mesh)
  step_fn = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config,
                                 num_steps=num_steps)
  start = time.perf_counter()
  compiled = step_fn.lower(state, train.abstract_batch(
      config, mesh, batch_size, pipeline.train_batch_dtypes(config))).compile()
  result = {'what': 'compile', 'topology': topology, 'device_kind': devices[0].device_kind,
            'devices': len(devices), 'backbone': config.model.backbone,
            'crop_size': config.data.crop_size, 'dtype': config.model.dtype,
            'batch_size': batch_size, 'batch_per_device': batch_size // len(devices),
            'peak_flops_per_device': chip.peak_flops,
            'hbm_bandwidth_per_device': chip.hbm_bandwidth,
            'compile_seconds': round(time.perf_counter() - start, 1),
            **step_report(compiled, chip)}
  if eval_step:
    sharding.local_batch_size(config.eval.batch_size, mesh)
    eval_fn = evaluation.jit_eval_step(mesh, graphdef=eval_graphdef, config=config)
    start = time.perf_counter()
    compiled_eval = eval_fn.lower(
        train_state.model_variables(state),
        train.abstract_batch(config, mesh, config.eval.batch_size,
                             pipeline.EVAL_BATCH_DTYPES)).compile()
    result['eval_compile_seconds'] = round(time.perf_counter() - start, 1)
    result.update({f'eval_{key}': value for key, value in step_report(compiled_eval,
                                                                        chip).items()})
  return result
