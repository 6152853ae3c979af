"""Prediction on image files: reading any image as RGB, outputs equal to the Predictor's, the
legend and prediction.json, the ownership of an output folder, and the command end to end.

Expected images come from other readers (cv2, or the arrays the files were
written from) and expected class maps from `Predictor.predict` on those
arrays, never from the code under test.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from pspnet_jax import checkpoint, inference, predictions
from pspnet_jax.data import meta, registry, synthetic
from test_inference import images, small_config, trained_looking_model
from test_layout import REPO


def rgb_config():
  """test_inference's small slide protocol with the synthetic dataset's own class count, so
  that its names and palette apply."""
  config = small_config()
  config.data.num_classes = synthetic.NUM_CLASSES
  return config


@pytest.fixture(scope='module')
def model():
  return trained_looking_model(rgb_config())


def write_inputs(folder) -> dict[str, np.ndarray]:
  """A JPEG, a grayscale, an RGBA and a 16-bit PNG and a broken file in `folder`; returns the
  RGB array each good one should be read as, by output name."""
  os.makedirs(folder)
  _, portrait, landscape, odd, square = (image for _, image in images())
  cv2.imwrite(os.path.join(folder, 'photo.jpg'), odd[..., ::-1])
  Image.fromarray(portrait[..., 0]).save(os.path.join(folder, 'gray.png'))
  alpha = np.linspace(0, 255, square.size // 3, dtype=np.uint8).reshape(square.shape[:2])
  Image.fromarray(np.dstack([square, alpha])).save(os.path.join(folder, 'rgba.png'))
  deep = landscape[..., 1].astype(np.uint16) * 256 + 255 - landscape[..., 2]
  cv2.imwrite(os.path.join(folder, 'deep.png'), deep)
  with open(os.path.join(folder, 'broken.png'), 'wb') as file:
    file.write(b'\x89PNG not really')
  return {'photo': cv2.imread(os.path.join(folder, 'photo.jpg'))[..., ::-1],
          'gray': np.repeat(portrait[..., :1], 3, -1),
          'rgba': square,
          'deep': np.repeat(landscape[..., 1:2], 3, -1)}


def test_read_image_gives_rgb_uint8_or_says_why(tmp_path):
  (_, image), *_ = images()
  path = str(tmp_path / 'x')
  gray16 = image[..., 0].astype(np.uint16) * 257 + 3
  cases = {  # written file -> the RGB array it must be read as
      'rgb.png': (lambda p: Image.fromarray(image).save(p), image),
      'gray.png': (lambda p: Image.fromarray(image[..., 0]).save(p),
                   np.repeat(image[..., :1], 3, -1)),
      'la.png': (lambda p: Image.fromarray(image[..., 0]).convert('LA').save(p),
                 np.repeat(image[..., :1], 3, -1)),
      'rgba.png': (lambda p: Image.fromarray(np.dstack([image, image[..., :1]])).save(p), image),
      'palette.png': (lambda p: Image.fromarray(image).quantize(16).save(p),
                      np.asarray(Image.fromarray(image).quantize(16).convert('RGB'))),
      'gray16.png': (lambda p: cv2.imwrite(p, gray16), np.repeat(image[..., :1], 3, -1)),
      'rgb16.png': (lambda p: cv2.imwrite(p, image[..., ::-1].astype(np.uint16) * 257 + 3),
                    image),
  }
  for suffix, (write, expected) in cases.items():
    write(path + suffix)
    np.testing.assert_array_equal(predictions.read_image(path + suffix), expected, suffix)

  # EXIF orientation 6: the file's pixels are shown rotated 90 degrees clockwise, as
  # cv2.imread (IMREAD_COLOR) returns them.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(image).save(path + 'turned.jpg', exif=exif)
  turned = predictions.read_image(path + 'turned.jpg')
  assert turned.shape == (image.shape[1], image.shape[0], 3)
  np.testing.assert_array_equal(turned, cv2.imread(path + 'turned.jpg')[..., ::-1])

  Image.fromarray(image).save(path + 'whole.jpg')
  with open(path + 'whole.jpg', 'rb') as file:
    data = file.read()
  broken = {'empty.png': b'', 'text.jpg': b'hello', 'half.jpg': data[:len(data) // 2]}
  for suffix, content in broken.items():
    with open(path + suffix, 'wb') as file:
      file.write(content)
  os.mkdir(path + 'folder.png')
  for suffix in [*broken, 'folder.png', 'missing.png']:
    with pytest.raises(predictions.UnreadableImage) as error:
      predictions.read_image(path + suffix)
    assert str(error.value).startswith(path + suffix) and error.value.reason, suffix


def test_find_inputs_names_files_distinctly(tmp_path):
  folder = tmp_path / 'in'
  for name in ('a.jpg', 'a.PNG', 'b.png', 'sub/b.png', 'sub/deeper/c.tif', 'notes.txt',
               '.hidden.png', 'out/gray/a.png'):
    os.makedirs((folder / name).parent, exist_ok=True)
    (folder / name).write_bytes(b'')
  found = predictions.find_inputs(str(folder), exclude=str(folder / 'out'))
  assert [(os.path.relpath(item.path, folder), item.name) for item in found] == [
      ('a.PNG', 'a.PNG'), ('a.jpg', 'a.jpg'), ('b.png', 'b'), ('sub/b.png', 'sub/b'),
      ('sub/deeper/c.tif', 'sub/deeper/c')]
  assert [item.name for item in predictions.find_inputs(str(folder / 'sub' / '*' / '*.tif'))] == [
      'deeper/c']
  assert [item.name for item in predictions.find_inputs(str(folder / '**' / 'b.png'))] == [
      'b', 'sub/b']
  assert predictions.find_inputs(str(folder / 'b.png')) == [
      predictions.ImageFile(str(folder / 'b.png'), 'b')]

  clash = tmp_path / 'clash'
  clash.mkdir()
  for name in ('a.jpg', 'a.png', 'a.jpg.png'):
    (clash / name).write_bytes(b'')
  with pytest.raises(ValueError, match='a.jpg.png'):
    predictions.find_inputs(str(clash))

  for spec, message in [(folder / 'nope', 'no such file or folder'),
                        (folder / 'out' / 'gray' / 'nothing*.png', 'no image files'),
                        (folder / 'out', 'no image files')]:
    with pytest.raises(FileNotFoundError, match=message) as error:
      predictions.find_inputs(str(spec), exclude=str(folder))
    assert str(error.value).startswith(f'input {spec}: ')


def test_predicts_a_folder_like_the_predictor(tmp_path, model):
  config = rgb_config()
  expected = write_inputs(str(tmp_path / 'in'))
  out = str(tmp_path / 'out')
  palette, names = registry.palette(config), registry.class_names(config)
  predictor = inference.Predictor.from_model(model, config)
  run = predictions.describe_run(config, str(tmp_path / 'run'), 0, predictor.protocol)
  predictions.claim_output(out, run)
  results = predictions.predict_files(predictor, predictions.find_inputs(str(tmp_path / 'in')),
                                      out, palette)
  predictions.write_summary(out, run, results, names, palette)

  legend = json.loads((tmp_path / 'out' / 'legend.json').read_text())
  present = set()
  for name, image in expected.items():
    classes, _ = predictor.predict(image)
    gray = cv2.imread(os.path.join(out, 'gray', f'{name}.png'), cv2.IMREAD_UNCHANGED)
    assert gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, classes, name)
    color = cv2.imread(os.path.join(out, 'color', f'{name}.png'))[..., ::-1]
    np.testing.assert_array_equal(color, palette[classes], name)
    overlay = cv2.imread(os.path.join(out, 'overlay', f'{name}.jpg'))[..., ::-1]
    blend = (image.astype(np.float32) + palette[classes]) / 2
    assert overlay.shape == image.shape and np.abs(overlay - blend).mean() < 4, name
    assert legend['images'][name] == np.unique(classes).tolist()
    present |= set(legend['images'][name])
  # The model's answer varies over the images: the comparisons mean something.
  assert len(present) > 1
  assert legend['classes'] == [{'index': index, 'name': names[index],
                                'color': palette[index].tolist()} for index in sorted(present)]
  assert (tmp_path / 'out' / 'legend.png').is_file()

  run_record = json.loads((tmp_path / 'out' / 'prediction.json').read_text())
  assert run_record['status'] == 'complete' and run_record['images'] == len(expected)
  assert run_record['protocol'] == predictor.protocol.settings()
  [skipped] = run_record['skipped']
  assert skipped['path'] == str(tmp_path / 'in' / 'broken.png') and skipped['reason']
  assert not (tmp_path / 'out' / 'gray' / 'broken.png').exists()


def test_many_classes_give_16_bit_class_maps(tmp_path):
  palette = meta.voc_palette(300)
  classes = np.arange(20 * 15).reshape(20, 15) % 300
  image = np.zeros((20, 15, 3), np.uint8)
  assert predictions.save_prediction(str(tmp_path), 'many', image, classes, palette) == list(
      range(300))
  gray = cv2.imread(str(tmp_path / 'gray' / 'many.png'), cv2.IMREAD_UNCHANGED)
  assert gray.dtype == np.uint16
  np.testing.assert_array_equal(gray, classes)
  np.testing.assert_array_equal(cv2.imread(str(tmp_path / 'color' / 'many.png'))[..., ::-1],
                                palette[classes])


def test_output_folder_belongs_to_one_model_and_protocol(tmp_path):
  config = rgb_config()
  slide = inference.Protocol.from_config(config)
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'out')
  run = predictions.describe_run(config, workdir, 3, slide)
  predictions.claim_output(out, run)
  (tmp_path / 'out' / 'gray').mkdir()
  (tmp_path / 'out' / 'gray' / 'a.png').write_bytes(b'')
  predictions.claim_output(out, run)          # the same model again reuses the folder

  others = {'step': predictions.describe_run(config, workdir, 4, slide),
            'workdir': predictions.describe_run(config, str(tmp_path / 'other'), 3, slide),
            "'whole'": predictions.describe_run(
                config, workdir, 3, inference.Protocol.from_config(config, 'whole'))}
  for differs, other in others.items():
    with pytest.raises(predictions.OutputInUse, match=f'holds predictions of .*{differs}'):
      predictions.claim_output(out, other)
  assert (tmp_path / 'out' / 'gray' / 'a.png').exists()

  predictions.claim_output(out, others['step'], overwrite=True)
  assert not (tmp_path / 'out' / 'gray').exists()
  assert json.loads((tmp_path / 'out' / 'prediction.json').read_text())['step'] == 4

  (tmp_path / 'out' / 'prediction.json').unlink()
  (tmp_path / 'out' / 'color').mkdir()
  (tmp_path / 'out' / 'color' / 'b.png').write_bytes(b'')
  with pytest.raises(predictions.OutputInUse, match='holds outputs but no prediction.json'):
    predictions.claim_output(out, run)


def test_legend_covers_every_run_into_the_folder(tmp_path):
  config = rgb_config()
  palette, names = registry.palette(config), registry.class_names(config)
  run = predictions.describe_run(config, str(tmp_path), 0, inference.Protocol.from_config(config))
  out = str(tmp_path / 'out')
  predictions.claim_output(out, run)
  predictions.write_summary(out, run, predictions.Results({'a': [0, 2]}, []), names, palette)
  predictions.write_summary(out, run, predictions.Results({'b': [5]}, []), names, palette)
  legend = json.loads((tmp_path / 'out' / 'legend.json').read_text())
  assert legend['images'] == {'a': [0, 2], 'b': [5]}
  assert [entry['name'] for entry in legend['classes']] == [names[0], names[2], names[5]]


@pytest.mark.slow
def test_predict_command_end_to_end(tmp_path, model):
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'out')
  checkpoint.save_model(workdir, 0, checkpoint.model_variables(model), {'source': 'test'})
  expected = write_inputs(str(tmp_path / 'in'))
  command = [sys.executable, '-m', 'pspnet_jax.predict', '--config=configs/demo.py',
             f'--workdir={workdir}', f'--output={out}', '--config.eval.protocol=slide',
             '--config.eval.crop_size=33', '--config.eval.base_size=48']

  def predict(*flags):
    return subprocess.run(command + list(flags), cwd=REPO, capture_output=True, text=True,
                          timeout=600)

  result = predict(f'--input={tmp_path / "in"}')
  assert result.returncode == 0, result.stderr[-3000:]
  config = rgb_config()
  predictor = inference.Predictor.from_model(checkpoint.load_model(config, workdir).model, config)
  for name, image in expected.items():
    gray = cv2.imread(os.path.join(out, 'gray', f'{name}.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(gray, predictor.predict(image)[0], name)
  run_record = json.loads((tmp_path / 'out' / 'prediction.json').read_text())
  assert run_record['config'] == 'configs/demo.py' and run_record['images'] == len(expected)
  assert [entry['path'] for entry in run_record['skipped']] == [str(tmp_path / 'in' / 'broken.png')]

  result = predict(f'--input={tmp_path / "in"}', '--config.eval.protocol=whole')
  assert result.returncode == 2   # a user's mistake (cli.EXIT_USER_ERROR), in one line
  assert f'output folder {out} holds predictions of' in result.stderr
  result = predict(f'--input={tmp_path / "nope"}')
  assert result.returncode == 2
  assert f'input {tmp_path / "nope"}: no such file or folder' in result.stderr
