"""Deployable exports, each run by its own runtime against the JAX model and the official model.

ONNX files run on ONNX Runtime, SavedModels on TensorFlow, TFLite flatbuffers
on the TFLite interpreter, `jax` exports through `jax.export.deserialize` in a
process that never imports this project. Every expected value comes from the
JAX model or the PyTorch twin of the official model, never from the exported
file itself.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
import torch

from configs import default
from pspnet_jax import checkpoint, deploy, weights
from parity import MMSEG_ARCHITECTURE, forward, make_twins, max_relative_diff, nchw, nhwc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _onnx_logits(proto, images):
  session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return session.run(['logits'], {'images': images})[0]


def _assert_same_classes(classes, expected_logits, tolerance):
  """The argmax of `expected_logits` at every pixel whose two best classes are more than
  2 * tolerance (relative to the largest logit) apart: where a rounding cannot swap them."""
  top2 = np.sort(expected_logits, axis=-1)[..., -2:]
  decisive = top2[..., 1] - top2[..., 0] > 2 * tolerance * np.max(np.abs(expected_logits))
  assert decisive.mean() > 0.95  # the check covers nearly every pixel
  np.testing.assert_array_equal(classes[decisive], np.argmax(expected_logits, -1)[decisive])


def _assert_close(actual, expected, tolerance=1e-4):
  """Logits within `tolerance` (relative to the largest), and the same classes."""
  assert actual.shape == expected.shape
  assert np.max(np.abs(actual - expected)) <= tolerance * np.max(np.abs(expected))
  _assert_same_classes(np.argmax(actual, -1), expected, tolerance)


# PSPNet-50 with 150 classes goes through ONNX in the official-checkpoint test below.
@pytest.mark.parametrize('depth,classes,size,kwargs', [
    (18, 21, 57, {'output_stride': 16, 'deep_stem': False}),
    (18, 21, 49, {'use_ppm': False}),
    (18, 19, 50, MMSEG_ARCHITECTURE),  # mmseg's model takes any size
])
def test_onnx_equals_the_jax_model_at_any_batch(depth, classes, size, kwargs):
  # Randomized BatchNorm statistics and affine parameters, so that folding them is exercised.
  _, model = make_twins(depth, classes, **kwargs)
  model.eval()
  proto = deploy.onnx_model(deploy.serving_function(model), (size, size))
  assert [op.version for op in proto.opset_import] == [deploy.ONNX_OPSET]
  # Every BatchNorm went into its convolution: no per-channel Sub or Mul remains.
  assert not {node.op_type for node in proto.graph.node} & {'Sub', 'Mul', 'BatchNormalization'}
  images = np.random.RandomState(0).randn(3, size, size, 3).astype(np.float32)
  for batch in (1, 3):  # the batch is symbolic (traced at 2)
    _assert_close(_onnx_logits(proto, images[:batch]), np.asarray(forward(model, images[:batch])))


def test_onnx_export_of_an_imported_official_checkpoint_gives_the_official_logits(tmp_path):
  """semseg .pth -> checkpoint (import) -> ONNX (export) -> ONNX Runtime, against the twin."""
  twin, _ = make_twins(50, 150)
  torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in twin.state_dict().items()}},
             tmp_path / 'official.pth')
  config = default.get_config()  # ADE20K's 150 classes
  config.data.crop_size = 65
  workdir = str(tmp_path / 'run')
  weights.import_weights(config, workdir, str(tmp_path / 'official.pth'), 'semseg')
  assert deploy.export_model(config, workdir, str(tmp_path / 'model.onnx'), 'onnx') == 0
  import onnx  # pylint: disable=import-outside-toplevel
  images = np.random.RandomState(1).randn(2, 65, 65, 3).astype(np.float32)
  with torch.no_grad():
    expected = nhwc(twin(nchw(images)))
  _assert_close(_onnx_logits(onnx.load(str(tmp_path / 'model.onnx')), images), expected)


def test_savedmodel_and_tflite_equal_the_jax_model(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # PSPNet-18 at output stride 16 with the 7x7 stem: PSPNet-50's conversions take 12 GiB and
  # 100 s here (its TensorFlow and TFLite logits, 473x473: BENCHMARKS.md, deploy row).
  _, model = make_twins(18, 21, output_stride=16, deep_stem=False)
  model.eval()
  size = 57
  forward_fn = deploy.serving_function(model)
  images = np.random.RandomState(3).randn(3, size, size, 3).astype(np.float32)
  expected = np.asarray(forward(model, images))

  deploy.export_savedmodel(forward_fn, str(tmp_path / 'saved'), (size, size))
  serve = tf.saved_model.load(str(tmp_path / 'saved')).signatures['serving_default']
  for batch in (1, 3):
    _assert_close(serve(images=tf.constant(images[:batch]))['logits'].numpy(), expected[:batch])

  for float16_weights, tolerance in ((False, 1e-4), (True, 1e-2)):
    interpreter = tf.lite.Interpreter(model_content=deploy.tflite_model(
        forward_fn, (size, size), float16_weights=float16_weights))
    source, = interpreter.get_input_details()
    interpreter.resize_tensor_input(source['index'], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source['index'], images)
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]['index'])
    _assert_close(logits, expected, tolerance)


def test_uint8_input_class_map_and_channels_first(tmp_path):
  """The alternatives to the contract, each against the JAX model on the normalized images."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  _, model = make_twins(18, 21, use_ppm=False)
  model.eval()
  config = default.get_config()
  size = 41
  raw = np.random.RandomState(4).randint(0, 256, (2, size, size, 3)).astype(np.uint8)
  normalized = (raw.astype(np.float32) - np.asarray(config.data.mean, np.float32)) / np.asarray(
      config.data.std, np.float32)
  expected = np.asarray(forward(model, normalized))
  options = {'mean': config.data.mean, 'std': config.data.std}

  # ONNX: raw uint8 NCHW in, NCHW logits out.
  serving = deploy.serving_function(model, uint8_input=True, channels_first=True, **options)
  proto = deploy.onnx_model(serving, (size, size))
  nchw_logits = _onnx_logits(proto, np.ascontiguousarray(np.transpose(raw, (0, 3, 1, 2))))
  _assert_close(np.transpose(nchw_logits, (0, 2, 3, 1)), expected)

  # SavedModel and ONNX: class maps, the same class wherever the JAX model is decisive.
  serving = deploy.serving_function(model, uint8_input=True, class_map=True, **options)
  deploy.export_savedmodel(deploy.serving_function(model), str(tmp_path / 'saved'), (size, size))
  # A SavedModel directory is replaced only with overwrite, and leaves no staging folder.
  with pytest.raises(FileExistsError, match='overwrite'):
    deploy.export_savedmodel(serving, str(tmp_path / 'saved'), (size, size))
  deploy.export_savedmodel(serving, str(tmp_path / 'saved'), (size, size), overwrite=True)
  assert os.listdir(tmp_path) == ['saved']
  serve = tf.saved_model.load(str(tmp_path / 'saved')).signatures['serving_default']
  session = onnxruntime.InferenceSession(deploy.onnx_model(serving, (size, size))
                                         .SerializeToString(), providers=['CPUExecutionProvider'])
  for classes in (serve(images=tf.constant(raw))['classes'].numpy(),
                  session.run(['classes'], {'images': raw})[0]):
    assert classes.dtype == np.int32 and classes.shape == expected.shape[:3]
    _assert_same_classes(classes, expected, 1e-4)


def test_jax_export_of_the_mmseg_architecture_takes_any_size(tmp_path):
  _, model = make_twins(18, 19, **MMSEG_ARCHITECTURE)
  model.eval()
  path = str(tmp_path / 'model.jax')
  deploy.export_jax(deploy.serving_function(model), path, None, any_size=True)
  call = deploy.load_jax(path)
  for shape in ((1, 50, 61, 3), (2, 40, 40, 3)):
    images = np.random.RandomState(0).randn(*shape).astype(np.float32)
    _assert_close(np.asarray(call(images)), np.asarray(forward(model, images)))
  config = default.get_config()
  config.model.align_corners = False
  assert deploy.export_size(config, (50, 61)) == (50, 61)


def test_export_size_must_be_8k_plus_1():
  config = default.get_config()
  assert deploy.export_size(config, None) == (config.data.crop_size,) * 2
  assert deploy.export_size(config, (65, 97)) == (65, 97)
  for size in (64, (65, 100), 25):
    with pytest.raises(ValueError, match='8k\\+1'):
      deploy.export_size(config, size)


def test_a_primitive_without_translation_is_named():
  with pytest.raises(NotImplementedError, match="'sin'"):
    deploy.onnx_model(deploy.Serving(jnp.sin, np.dtype(np.float32), False, 'logits'), (33, 33))


@pytest.mark.slow
def test_jax_export_from_the_command_runs_without_the_project(tmp_path):
  _, model = make_twins(18, 21)
  model.eval()
  config = default.get_config()
  config.data.num_classes = 21
  config.model.backbone = 'resnet18'
  tensors = weights.to_torch_state_dict(checkpoint.model_variables(model))
  weights.write_tensors(tensors, str(tmp_path / 'w.safetensors'), 'safetensors', epoch=0)
  weights.import_weights(config, str(tmp_path / 'run'), str(tmp_path / 'w.safetensors'),
                         'safetensors')
  # The command, without --export_size: any 8k+1 size.
  subprocess.run([sys.executable, '-m', 'pspnet_jax.convert', '--config=configs/default.py',
                  '--config.data.num_classes=21', '--config.model.backbone=resnet18',
                  f'--workdir={tmp_path / "run"}', f'--export_path={tmp_path / "pspnet.jax"}',
                  '--format=jax'], cwd=REPO, check=True, capture_output=True)
  shapes = [(2, 41, 57), (1, 33, 33)]
  for index, shape in enumerate(shapes):
    np.save(tmp_path / f'images{index}.npy',
            np.random.RandomState(index).randn(*shape, 3).astype(np.float32))
  # The README's way to run it: jax alone, from another directory.
  run = ('import jax, numpy as np; '
         'f = jax.export.deserialize(open("pspnet.jax", "rb").read()).call; '
         f'[np.save(f"logits{{i}}.npy", np.asarray(f(np.load(f"images{{i}}.npy")))) '
         f'for i in range({len(shapes)})]')
  subprocess.run([sys.executable, '-c', run], cwd=tmp_path, check=True, capture_output=True,
                 env={**os.environ, 'PYTHONPATH': ''})
  for index in range(len(shapes)):
    images = np.load(tmp_path / f'images{index}.npy')
    _assert_close(np.load(tmp_path / f'logits{index}.npy'), np.asarray(forward(model, images)))
  # A fixed size (--export_size) and a class map; the in-process loader runs that file.
  deploy.export_jax(deploy.serving_function(model, class_map=True), str(tmp_path / 'fixed.jax'),
                    (41, 57))
  fixed = deploy.load_jax(str(tmp_path / 'fixed.jax'))
  images = np.load(tmp_path / 'images0.npy')
  _assert_same_classes(np.asarray(fixed(images)), np.asarray(forward(model, images)), 1e-4)
  with pytest.raises(Exception, match='shape'):
    fixed(np.load(tmp_path / 'images1.npy'))
