"""The train state is built on the devices as the eager model would be, restored into its
shardings without reading `model.pretrained`, and `checkpoint.load_model` serves every consumer."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from pspnet_jax import checkpoint, optim, sharding, train_state, weights
from pspnet_jax.models import create_model
from pspnet_jax.torch_reference import ResNet as TorchResNet
from test_checkpoint import training_meta



def small_config(**model):
  config = default.get_config()
  config.data.num_classes = 5
  config.model.backbone = 'resnet18'
  config.model.update(model)
  return config


def pure(variables: nnx.State) -> dict:
  return jax.device_get(variables.to_pure_dict())


def assert_trees_equal(actual, expected, rtol=0.0):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=jax.tree_util.keystr(path))


def assert_replicated(tree, mesh):
  for leaf in jax.tree.leaves(tree):
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim), leaf.sharding


def test_fresh_state_on_the_mesh_is_the_eager_model():
  config = small_config()
  mesh = sharding.make_mesh()
  state = train_state.init_train_state(config, optim.create_optimizer(config.optim, 10), mesh)
  eager = create_model(config, rngs=nnx.Rngs(config.seed))
  # The same random bits; XLA fuses the scaling of the draws under jit, which may round
  # the last bit differently from the op-by-op eager run.
  assert_trees_equal(pure(nnx.merge_state(state.params, state.batch_stats)),
                     pure(checkpoint.model_variables(eager)), rtol=1e-6)
  assert_replicated(state, mesh)
  assert int(state.step) == 0 and int(state.applied_steps) == 0
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(jax.device_get(state.opt_state)))


def test_pretrained_backbone_is_read_by_a_fresh_run_only(tmp_path, monkeypatch):
  imagenet = {key: value.numpy() for key, value in TorchResNet(18).state_dict().items()}
  path = str(tmp_path / 'resnet18_imagenet.safetensors')
  weights.write_tensors(imagenet, path, 'safetensors', epoch=0)
  config = small_config(pretrained=path, pretrained_format='semseg-resnet')
  mesh = sharding.make_mesh()
  tx = optim.create_optimizer(config.optim, 10)
  state = train_state.init_train_state(config, tx, mesh)
  assert_replicated(state, mesh)

  variables = nnx.merge_state(state.params, state.batch_stats)
  random_init = checkpoint.model_variables(create_model(config, rngs=nnx.Rngs(config.seed)))
  expected = weights.backbone_from_file(random_init, path, 'semseg-resnet', deep_stem=True)
  assert_trees_equal(pure(variables), pure(expected), rtol=1e-6)
  ours = weights.to_torch_state_dict(variables)
  np.testing.assert_array_equal(ours['layer0.0.weight'], imagenet['conv1.weight'])
  np.testing.assert_allclose(ours['cls.4.weight'],
                             weights.to_torch_state_dict(random_init)['cls.4.weight'], rtol=1e-6)

  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path / 'run'))
  checkpointer.save(3, *train_state.checkpoint_items(state), training_meta(3))
  checkpointer.wait_until_finished()
  # A resumed run must not need the file: gone, and any read of weights fails loudly.
  (tmp_path / 'resnet18_imagenet.safetensors').unlink()
  monkeypatch.setattr(weights, 'read_tensors', lambda *args: pytest.fail('read a weights file'))
  resumed = train_state.restore_train_state(config, tx, mesh, checkpointer)
  checkpointer.close()
  restored = resumed.state
  assert resumed.has_optimizer and resumed.step == 3 and resumed.meta['step'] == 3
  assert_replicated(restored, mesh)
  assert_trees_equal(pure(nnx.merge_state(restored.params, restored.batch_stats)), pure(variables))


def test_a_missing_pretrained_file_is_named_by_its_key(tmp_path):
  config = small_config(pretrained=str(tmp_path / 'absent.pth'))
  with pytest.raises(ValueError, match=r'config\.model\.pretrained=.*absent\.pth.*no such file'):
    train_state.init_train_state(config, optim.create_optimizer(config.optim, 10),
                                 sharding.make_mesh())


def test_load_model_gives_a_step_in_eval_mode_or_names_the_steps_there_are(tmp_path):
  config = small_config()
  workdir = str(tmp_path / 'run')
  with pytest.raises(FileNotFoundError, match=f'no checkpoint in {workdir}'):
    checkpoint.load_model(config, workdir)
  saved = {}
  for step in (0, 2):
    model = create_model(config, rngs=nnx.Rngs(step))
    saved[step] = pure(checkpoint.model_variables(model))
    checkpoint.save_model(workdir, step, checkpoint.model_variables(model), {'source': 'test'})
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 1 .* \[0, 2\]'):
    checkpoint.load_model(config, workdir, 1)

  mesh = sharding.make_mesh()
  loaded = checkpoint.load_model(config, workdir, mesh=mesh)
  assert loaded.step == 2 and loaded.meta['source'] == 'test'
  assert_trees_equal(pure(checkpoint.model_variables(loaded.model)), saved[2])
  assert_replicated(checkpoint.model_variables(loaded.model), mesh)
  assert loaded.model.cls.dropout.deterministic and loaded.model.layer0.bn1.use_running_average
  assert_trees_equal(pure(checkpoint.model_variables(checkpoint.load_model(config, workdir, 0).model)),
                     saved[0])
