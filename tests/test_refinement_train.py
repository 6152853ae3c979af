"""CascadePSP training (config.task='refinement') against the official code and invariants.

- The objective and its gradients: our train-mode refinement module and loss on a batch
  against the official `RefinementModule` (segmentation-refinement 0.6) in train mode with the
  same weights and a transcription of the official `compute_loss_and_metrics`
  (tests/test_losses.py), backpropagated by torch. The optimizer itself is proven against
  torch's Adam + MultiStepLR in tests/test_optim.py.
- The sharded step: 8 devices (the batch split, BatchNorm synchronized by the sharding) take
  the same first step as 1 device.
- The loop: a few steps of the demo config through `train_and_evaluate`, with its rows and
  the refinement evaluation's metrics.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import cascadepsp
from pspnet_jax import optim, refinement_training, sharding, train, train_state, weights
from pspnet_jax.models.cascadepsp import RefinementModule
from cascadepsp_parity import random_official
from parity import nchw
from test_losses import _official_refinement_loss


def _batch(size=32, batch=2, seed=0):
  """A training batch as the pipeline gives it: normalized image, 0/255 input mask, soft gt."""
  rng = np.random.default_rng(seed)
  gt = np.zeros((batch, size, size), np.float32)
  gt[:, size // 4:3 * size // 4, size // 5:4 * size // 5] = 255
  gt = np.clip(gt + rng.normal(0, 40, gt.shape), 0, 255).astype(np.uint8)
  mask = np.roll(gt > 127, 3, axis=2).astype(np.uint8) * 255
  image = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  return {'image': image, 'mask': mask, 'gt': gt}


def test_objective_and_gradients_equal_the_official_training_computation():
  """In float64 end to end: in float32, train-mode BatchNorm over three passes amplifies
  rounding (the official float32 module against its own float64 moves as much as ours)."""
  config = cascadepsp.get_config()
  official = random_official(seed=0).double().train()
  batch = _batch()

  # The official step: seg_transform's (x / 255 - 0.5) / 0.5 mask, gt / 255 (ToTensor).
  images = nchw(batch['image'].astype(np.float64))
  seg = torch.tensor(batch['mask'][:, None].astype(np.float64) / 255 * 2 - 1)
  gt = torch.tensor(batch['gt'][:, None].astype(np.float64) / 255)
  outputs = official(images, seg)
  para = {'ce_weight': config.loss.ce_weights, 'l1_weight': config.loss.l1_weights,
          'l2_weight': config.loss.l2_weights, 'grad_weight': config.loss.grad_weight}
  expected_loss, _ = _official_refinement_loss({**outputs, 'gt': gt}, para)
  expected_loss.backward()
  expected_grads = {name: p.grad.numpy() for name, p in official.named_parameters()}

  with jax.enable_x64(True):
    model = nnx.eval_shape(lambda: RefinementModule(dtype=jnp.float64, rngs=nnx.Rngs(0)))
    tensors = {key: value.detach().numpy() for key, value in official.state_dict().items()}
    nnx.update(model, weights.from_cascadepsp_state_dict(tensors, nnx.state(model)))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    objective = refinement_training.objective_of(config)

    def loss_fn(params):
      merged = nnx.merge(graphdef, params, rest, copy=True)
      return objective(merged, jnp.asarray(batch['image'], jnp.float64), batch)

    (loss, step_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss, step_metrics, grads = jax.device_get((loss, step_metrics, grads))
    # The named gradients in the official layout (BatchNorm statistics take none).
    ours = weights.to_cascadepsp_state_dict(nnx.merge_state(grads, jax.tree.map(
        np.zeros_like, nnx.state(model, nnx.BatchStat))))
  np.testing.assert_allclose(float(loss), expected_loss.item(), rtol=1e-8)
  assert set(expected_grads) <= set(ours)
  total = np.sqrt(sum(np.sum(g**2) for g in expected_grads.values()))
  worst = max(np.max(np.abs(ours[name] - g)) for name, g in expected_grads.items())
  assert worst <= 1e-8 * total, (worst, total)
  # The step's IoUs are the official training log's (iou/orig_iou, iou/new_iou_224).
  truth = batch['gt'] > 127
  given = batch['mask'] > 127
  assert float(step_metrics['input_iou']) == pytest.approx(
      np.sum(given & truth) / np.sum(given | truth), rel=1e-9)
  refined = outputs['pred_224'].detach().numpy()[:, 0] > 0.5
  assert float(step_metrics['iou']) == pytest.approx(
      np.sum(refined & truth) / np.sum(refined | truth), rel=1e-9)


def _small_config():
  config = cascadepsp.get_config('demo')
  config.data.crop_size = 40
  config.model.refine_widths = (32, 16, 16, 8)
  config.train.batch_size = 8
  return config


def _first_step(config, devices):
  mesh = sharding.make_mesh(devices)
  tx = optim.create_optimizer(config.optim, 10, config.train.batch_size)
  state = train_state.init_train_state(config, tx, mesh)
  graphdef, _ = train_state.graphdefs(config)
  step = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config, num_steps=10)
  batch = _batch(size=40, batch=8, seed=1)
  batch['image'] = batch['image'].astype(np.float32)
  state, step_metrics = step(state, sharding.to_global(batch, mesh))
  return jax.device_get((state.params, state.batch_stats, step_metrics))


def test_eight_devices_take_the_same_first_step_as_one():
  config = _small_config()
  params_1, stats_1, metrics_1 = _first_step(config, jax.devices()[:1])
  params_8, stats_8, metrics_8 = _first_step(config, jax.devices())
  assert float(metrics_8['loss']) == pytest.approx(float(metrics_1['loss']), rel=1e-5)
  # Synchronized BatchNorm: the running statistics come from the global batch.
  for one, eight in zip(jax.tree.leaves(stats_1), jax.tree.leaves(stats_8)):
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5)
  # Adam's first update is about lr * sign(gradient): compare where it moved by more than
  # reduction-order noise can flip.
  for one, eight in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(eight, one, atol=2 * config.optim.base_lr)


def test_a_short_run_trains_evaluates_and_logs_the_refinement_metrics(tmp_path):
  config = _small_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.synthetic.num_train = 16
  config.data.synthetic.num_validation = 4
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.checkpoint_every = 4
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [row for row in rows if 'train/loss' in row]
  assert [row['step'] for row in train_rows] == [2, 4]
  for key in ('ce_loss', 'l1_loss', 'l2_loss', 'grad_loss', 'iou', 'input_iou', 'lr_backbone'):
    assert np.isfinite(train_rows[-1][f'train/{key}'])
  assert train_rows[-1]['train/lr_backbone'] == pytest.approx(config.optim.base_lr)
  eval_row = [row for row in rows if 'eval/mIoU' in row][-1]
  assert eval_row['step'] == 4
  for key in ('fg_IoU', 'input_fg_IoU', 'mBA', 'input_mBA'):
    assert eval_row[f'eval/{key}'] == pytest.approx(results[key])
  assert 0.4 < results['input_fg_IoU'] < 1.0   # the stored perturbed input masks


def test_the_config_is_the_official_recipe():
  """configs/cascadepsp.py against the official util/hyper_para.py defaults and train.py."""
  config = cascadepsp.get_config()
  from pspnet_jax import configuration  # pylint: disable=import-outside-toplevel
  configuration.validate(config)
  configuration.validate(cascadepsp.get_config('demo'))
  assert (config.optim.name, config.optim.schedule) == ('adam', 'multistep')
  assert config.optim.base_lr == 2.25e-4 and config.optim.weight_decay == 1e-4
  assert tuple(config.optim.milestones) == (22500, 37500) and config.optim.gamma == 0.1
  assert config.train.num_steps == 45000 and config.train.batch_size == 12
  assert config.data.crop_size == 224 and config.refine.L == 900
  assert tuple(config.loss.ce_weights) == (0.0, 1.0, 0.5, 1.0, 1.0, 0.5)
  assert tuple(config.loss.l1_weights) == (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
  assert tuple(config.loss.l2_weights) == (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
  assert config.loss.grad_weight == 5
  assert config.model.backbone == 'resnet50' and tuple(config.model.refine_widths) == (
      1024, 512, 256, 32)
  assert config.model.pretrained.endswith('/resnet50-19c8e357.pth')   # extractors.model_urls


@pytest.mark.parametrize('key, value, message', [
    ('refine.L', 65, 'refine.L=65: must be an integer >= 66'),
    ('data.crop_size', 100, 'data.crop_size=100: must be a multiple of 8'),
    ('data.num_classes', 3, 'data.num_classes=3: must be 2'),
    ('model.backbone', 'resnet152', "model.backbone='resnet152': must be one of"),
    ('eval.at_end_of_training', True, 'eval.at_end_of_training=True: must be False'),
])
def test_refinement_config_mistakes_are_named(key, value, message):
  from pspnet_jax import configuration  # pylint: disable=import-outside-toplevel
  config = cascadepsp.get_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
    configuration.validate(config)
