"""The ahead-of-time planner (`benchmark --what=compile`, benchmarks/compile_plan.py) against
references it does not produce: the same train step compiled by XLA:CPU, the bytes of the
abstract train state, hand-counted collectives, and arithmetic on given numbers.

The TPU compile needs libtpu (requirements-tpu-plan.txt, part of requirements-dev.txt); it
plans the demo's ResNet-18 on 33x33 crops for a v5e 2x2 slice (about a minute on 2 cores).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import demo
from pspnet_jax import evaluation, optim, sharding, train, train_state
from pspnet_jax.benchmarks import compile_plan
from pspnet_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP, BATCH, DEVICES = 33, 8, 4   # v5e:2x2 has 4 chips: 2 crops each


def tiny_config():
  config = demo.get_config()
  config.data.crop_size = CROP
  config.eval.batch_size = DEVICES
  return config


def test_roofline_on_given_numbers():
  chip = compile_plan.Chip(peak_flops=100e12, hbm_bytes=16 * 2**30, hbm_bandwidth=1e12,
                           megacore=False)
  # 2 TFLOP take 20 ms at peak; 10 GB take 10 ms: compute bound, all of the peak reachable.
  bound = compile_plan.roofline(2e12, 10e9, chip)
  assert bound['roofline_seconds'] == pytest.approx(0.02)
  assert (bound['bound'], bound['roofline_mfu']) == ('compute', pytest.approx(1.0))
  # 40 GB take 40 ms: memory bound, and the 20 ms of compute allow half the peak.
  bound = compile_plan.roofline(2e12, 40e9, chip)
  assert bound['roofline_seconds'] == pytest.approx(0.04)
  assert (bound['bound'], bound['roofline_mfu']) == ('memory', pytest.approx(0.5))


def test_collectives_counted_by_opcode_once_per_instruction():
  hlo = '\n'.join([
      '%all-reduce-start.3 = (f32[8]) all-reduce-start(f32[8] %a), to_apply=%add',
      '%all-reduce-done.3 = f32[8] all-reduce-done((f32[8]) %all-reduce-start.3)',
      '%all-reduce.1 = (f32[], f32[4]) all-reduce(f32[] %b, f32[4] %c), to_apply=%add',
      '%all-gather = f32[16]{0:T(128)} all-gather(f32[4] %d), dimensions={0}',
      '%fusion.7 = f32[8] fusion(f32[8] %all-reduce.1), kind=kLoop',   # a use, not a collective
      'ROOT %r = f32[8] reduce-scatter(f32[32] %e), dimensions={0}'])
  assert compile_plan.collective_counts(hlo) == {
      'all_reduces': 2, 'all_gathers': 1, 'reduce_scatters': 1, 'collective_permutes': 0,
      'all_to_alls': 0}


def test_a_sum_over_the_sharded_batch_is_one_all_reduce():
  def counts(devices):
    mesh = sharding.make_mesh(jax.devices()[:devices])
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS)))
    compiled = jax.jit(jnp.sum).lower(x).compile()
    return compile_plan.collective_counts(compiled.as_text())['all_reduces']

  assert (counts(1), counts(4)) == (0, 1)


@pytest.fixture(scope='module')
def cpu_step():
  """The tiny train step compiled by XLA:CPU on 4 devices, with its abstract state."""
  config = tiny_config()
  mesh = sharding.make_mesh(jax.devices()[:DEVICES])
  tx = optim.create_optimizer(config.optim, 1)
  graphdef, eval_graphdef = train_state.graphdefs(config)
  state = train_state.abstract_train_state(config, tx, mesh)
  compiled = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config,
                                  num_steps=1).lower(
                                      state, train.abstract_batch(
                                          config, mesh, BATCH,
                                          pipeline.train_batch_dtypes(config))).compile()
  return config, mesh, state, eval_graphdef, compiled


def reference_argument_bytes(state) -> int:
  """The replicated train state plus one device's share of the batch (float32 image, uint8
  label)."""
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return state_bytes + BATCH // DEVICES * CROP * CROP * (3 * 4 + 1)


def test_compiled_costs_arguments_are_the_state_and_a_batch_share(cpu_step):
  _, _, state, _, compiled = cpu_step
  costs = train.compiled_costs(compiled)
  assert costs['argument_bytes'] == reference_argument_bytes(state)
  # The new state reuses the donated old one; the metrics are the only new outputs.
  assert costs['output_bytes'] - costs['alias_bytes'] < 4096
  assert costs['peak_bytes'] >= costs['argument_bytes'] + costs['temp_bytes']
  assert costs['flops'] > 0 and costs['bytes_accessed'] > 0


def test_fit_flag_compares_the_peak_with_the_chips_memory(cpu_step):
  compiled = cpu_step[-1]
  peak = train.compiled_costs(compiled)['peak_bytes']
  report = lambda hbm: compile_plan.step_report(compiled, compile_plan.Chip(
      peak_flops=1e12, hbm_bytes=hbm, hbm_bandwidth=1e11, megacore=False))
  assert report(peak)['fits'] and not report(peak - 1)['fits']


def test_eval_step_has_one_all_reduce_the_confusion_matrix(cpu_step):
  """Eval-mode BatchNorm uses its running statistics: the only cross-device sum is the
  confusion matrix of the batch."""
  config, mesh, state, eval_graphdef, _ = cpu_step
  eval_fn = evaluation.jit_eval_step(mesh, graphdef=eval_graphdef, config=config)
  compiled = eval_fn.lower(train_state.model_variables(state),
                           train.abstract_batch(config, mesh, config.eval.batch_size,
                                                pipeline.EVAL_BATCH_DTYPES)).compile()
  assert compile_plan.collective_counts(compiled.as_text())['all_reduces'] == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu missing: pip install -r requirements-tpu-plan.txt')
def test_compile_command_plans_the_step_for_a_v5e_slice(cpu_step):
  """One JSON line whose numbers agree with XLA:CPU's compile of the same step."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'pspnet_jax.benchmark', '--config=configs/demo.py',
       '--what=compile', '--topology=v5e:2x2', f'--batch_size={BATCH}',
       f'--config.data.crop_size={CROP}', '--noplan_eval'],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  plan = json.loads(lines[0])
  assert (plan['topology'], plan['device_kind'], plan['devices'], plan['batch_per_device']) == (
      'v5e:2x2', 'TPU v5 lite', DEVICES, BATCH // DEVICES)
  _, _, state, _, cpu_compiled = cpu_step
  cpu = train.compiled_costs(cpu_compiled)
  # The same partitioned program: TPU's fusion and layouts move the count by a few percent.
  assert plan['flops'] == pytest.approx(cpu['flops'], rel=0.1)
  # TPU pads small arrays to its tiles: up to ~1% more than the plain bytes (1.0% here).
  reference = reference_argument_bytes(state)
  assert reference <= plan['argument_bytes'] <= 1.02 * reference
  assert plan['argument_bytes'] + plan['temp_bytes'] <= plan['peak_bytes'] <= 2**30
  assert plan['fits'] and plan['hbm_bytes'] == 16 * 2**30
  # BatchNorm over the global batch and the gradient sum need cross-device reductions.
  assert plan['all_reduces'] >= 1
  assert 0 < plan['roofline_mfu'] <= 1
  assert plan['roofline_seconds'] >= plan['flops'] / 197e12
