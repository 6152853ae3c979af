"""Data side: the synthetic context dataset, semseg's augmentation, the Grain/TFDS loaders.

Datasets are tiny (12 train / 7 validation images of 33-65 px) and built once
per module; the loader tests that need to know which example landed where use
an in-memory source whose pixel values are the example's index.
"""

import cv2
import numpy as np
import pytest

from configs import default
from fake_datasets import block_label
from pspnet_jax.data import labels, pipeline, synthetic, transforms

IGNORE = labels.IGNORE_LABEL
MEAN = default.get_config().data.mean
STD = default.get_config().data.std


def tiny_config(data_dir, seed=0):
  config = default.get_config()
  config.seed = seed
  config.data.name = 'synthetic'
  config.data.data_dir = str(data_dir)
  config.data.num_classes = synthetic.NUM_CLASSES
  config.data.crop_size = 33
  config.data.synthetic.num_train = 12
  config.data.synthetic.num_validation = 7
  config.data.synthetic.min_size = 33
  config.data.synthetic.max_size = 65
  # Divisible by 1, 2 and 3 processes.
  config.train.batch_size = 6
  config.eval.batch_size = 6
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  synthetic.prepare(tiny_config(path))
  return path


def read_split(config, split):
  source = pipeline.load_split(config, split)
  check = pipeline.DecodeAndCheck(synthetic.NUM_CLASSES, IGNORE)
  return {example['file_name']: example for example in map(check.map, source)}


# --- the synthetic dataset -------------------------------------------------------------------


def test_same_seed_same_dataset_other_seed_other_folder(data_dir, tmp_path):
  first = read_split(tiny_config(data_dir), 'train')
  again = read_split(tiny_config(tmp_path / 'again'), 'train')
  assert sorted(first) == sorted(again) == [f'train/{i:06d}.png' for i in range(12)]
  for name, example in first.items():
    np.testing.assert_array_equal(example['image'], again[name]['image'])
    np.testing.assert_array_equal(example['label'], again[name]['label'])
  # Another seed in the same data dir is another folder, not the first dataset reused.
  other = read_split(tiny_config(data_dir, seed=1), 'train')
  folders = {path.name for path in (data_dir / 'synthetic_context').iterdir()}
  assert {'seed0-train12-val7-size33-65', 'seed1-train12-val7-size33-65'} <= folders
  for name, example in first.items():
    image, other_image = example['image'], other[name]['image']
    assert image.shape != other_image.shape or not np.array_equal(image, other_image)


def test_stored_examples_are_the_rendered_ones_with_valid_labels(data_dir):
  for split, count in (('train', 12), ('validation', 7)):
    examples = read_split(tiny_config(data_dir), split)
    assert len(examples) == count
    for index in range(count):
      example = examples[f'{split}/{index:06d}.png']
      rng = synthetic.example_rng(0, split, index)
      height, width = rng.integers(33, 66, size=2)
      image, label = synthetic.render_example(rng, int(height), int(width))
      # Through PNG and TFDS and back: lossless, and still RGB.
      np.testing.assert_array_equal(example['image'], image)
      np.testing.assert_array_equal(example['label'], label)
      values = set(np.unique(label).tolist())
      assert values <= set(range(synthetic.NUM_CLASSES)) | {IGNORE}


def test_boat_and_car_are_drawn_by_the_same_code():
  # The same random streams with the scene forced each way: only the band and
  # the name of the vehicle class may change.
  for seed in range(20):
    harbour_image, harbour = synthetic.render_example(np.random.default_rng(seed), 57, 71,
                                                      scene='harbour')
    street_image, street = synthetic.render_example(np.random.default_rng(seed), 57, 71,
                                                    scene='street')
    np.testing.assert_array_equal(harbour == 3, street == 4)
    assert (harbour == 3).any()
    np.testing.assert_array_equal(harbour == 1, street == 2)
    outside_band = harbour != 1
    np.testing.assert_array_equal(harbour_image[outside_band], street_image[outside_band])
    assert not np.array_equal(harbour_image[~outside_band], street_image[~outside_band])


def scene_pixels(count):
  """Rendered examples at the tiny sizes: list of (image, label)."""
  examples = []
  for index in range(count):
    rng = synthetic.example_rng(7, 'train', index)
    height, width = rng.integers(33, 66, size=2)
    examples.append(synthetic.render_example(rng, int(height), int(width)))
  return examples


def test_context_classes_only_in_their_scene_and_far_from_the_band():
  scenes = {'harbour': 0, 'street': 0}
  for image, label in scene_pixels(80):
    present = set(np.unique(label).tolist())
    for (scene, (band_class, vehicle_class)), other_scene_classes in zip(
        synthetic.SCENES.items(), reversed(synthetic.SCENES.values())):
      if vehicle_class in present:
        scenes[scene] += 1
        assert band_class in present and not present & set(other_scene_classes)
        # Every boat/car pixel is at least ~45% of the image from the band.
        not_band = (label != band_class).astype(np.uint8)
        distance = cv2.distanceTransform(not_band, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        assert distance[label == vehicle_class].min() >= 0.4 * min(label.shape)
    assert (3 in present) != (4 in present)
  assert min(scenes.values()) >= 25


def test_boat_and_car_colours_match_and_differ_from_water_and_road():
  pixels = {cls: [] for cls in range(synthetic.NUM_CLASSES)}
  for image, label in scene_pixels(500):
    for cls in pixels:
      pixels[cls].append(image[label == cls].astype(np.float64))
  stats = {cls: (np.concatenate(p).mean(0), np.concatenate(p).std(0)) for cls, p in pixels.items()}
  boat, car = stats[3], stats[4]
  # Both are drawn from the same distribution: over ~370 vehicles each, the
  # spread of the four hull colours (~80 grey levels) leaves the means ~4 levels
  # apart (one standard error); the band classes are far away.
  np.testing.assert_allclose(boat[0], car[0], atol=12)
  np.testing.assert_allclose(boat[1], car[1], atol=12)
  for band in (1, 2):
    assert np.abs(stats[band][0] - boat[0]).max() > 60


# --- transforms ------------------------------------------------------------------------------


def coded_pair(height, width, classes=(0, 3, 5), seed=0):
  """A label of random blocks and an image whose pixels encode it: channel 0 = 10 * class."""
  label = block_label(height, width, classes, 4, seed)
  image = np.stack([label * 10.0, np.arange(width)[None, :].repeat(height, 0),
                    np.arange(height)[:, None].repeat(width, 1)], -1).astype(np.float32)
  return image, label


def test_hflip_is_the_mirror():
  image, label = coded_pair(9, 14)
  flipped, flipped_label = transforms.hflip(image, label, np.random.default_rng(0), prob=1.0)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(flipped_label, label[:, ::-1])
  same, same_label = transforms.hflip(image, label, np.random.default_rng(0), prob=0.0)
  np.testing.assert_array_equal(same, image)
  np.testing.assert_array_equal(same_label, label)


def test_crop_of_a_small_image_pads_with_mean_and_ignore_around_it():
  image, label = coded_pair(20, 25)
  crop, crop_label = transforms.rand_crop(image, label, np.random.default_rng(0), 33, MEAN,
                                          IGNORE)
  # pad_h = 13: 6 rows on top, 7 below; pad_w = 8: 4 columns each side.
  np.testing.assert_array_equal(crop[6:26, 4:29], image)
  np.testing.assert_array_equal(crop_label[6:26, 4:29], label)
  border = np.ones((33, 33), bool)
  border[6:26, 4:29] = False
  assert (crop_label[border] == IGNORE).all()
  np.testing.assert_allclose(crop[border], np.broadcast_to(MEAN, crop[border].shape), rtol=1e-6)


def test_crop_of_a_large_image_is_an_aligned_window():
  image, label = coded_pair(50, 61)
  offsets = set()
  for seed in range(20):
    crop, crop_label = transforms.rand_crop(image, label, np.random.default_rng(seed), 33, MEAN,
                                            IGNORE)
    # Channels 1 and 2 hold the column and the row: the window's corner.
    left, top = int(crop[0, 0, 1]), int(crop[0, 0, 2])
    offsets.add((top, left))
    np.testing.assert_array_equal(crop, image[top:top + 33, left:left + 33])
    np.testing.assert_array_equal(crop_label, label[top:top + 33, left:left + 33])
    np.testing.assert_array_equal(crop[..., 0], crop_label * 10.0)
  assert len(offsets) > 10


def test_scale_is_opencv_nearest_for_labels_and_adds_no_class():
  image, label = coded_pair(10, 13)
  scaled, scaled_label = transforms.rand_scale(image, label, np.random.default_rng(0), 2.0, 2.0)
  np.testing.assert_array_equal(scaled_label, label.repeat(2, 0).repeat(2, 1))
  assert scaled.shape == (20, 26, 3) and scaled.dtype == np.float32
  image, label = coded_pair(37, 45)
  for seed in range(10):
    _, scaled_label = transforms.rand_scale(image, label, np.random.default_rng(seed), 0.5, 2.0)
    assert set(np.unique(scaled_label)) <= set(np.unique(label))


class FixedDraws:
  """Stands in for the generator: random() gives 0, uniform() the given value."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return 0.0

  def uniform(self, low, high):
    assert low <= self.value <= high
    return self.value


def test_rotate_fills_corners_with_mean_and_ignore_and_adds_no_class():
  image, label = coded_pair(40, 60)
  for angle in (-10.0, 4.0, 10.0):
    rotated, rotated_label = transforms.rand_rotate(image, label, FixedDraws(angle), 10.0, 0.5,
                                                    MEAN, IGNORE)
    assert rotated.shape == image.shape and rotated_label.shape == label.shape
    # A rotated rectangle leaves every corner of the frame uncovered.
    for row, col in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
      assert rotated_label[row, col] == IGNORE
      np.testing.assert_allclose(rotated[row, col], MEAN, rtol=1e-5)
    assert set(np.unique(rotated_label)) <= set(np.unique(label)) | {IGNORE}
  for seed in range(10):
    _, rotated_label = transforms.rand_rotate(image, label, np.random.default_rng(seed), 10.0,
                                              0.5, MEAN, IGNORE)
    assert set(np.unique(rotated_label)) <= set(np.unique(label)) | {IGNORE}
  unrotated = transforms.rand_rotate(image, label, np.random.default_rng(0), 10.0, 0.0, MEAN,
                                     IGNORE)
  np.testing.assert_array_equal(unrotated[1], label)


def test_blur_is_a_5x5_gaussian_on_the_image_only():
  image, label = coded_pair(12, 15)
  blurred, blurred_label = transforms.gaussian_blur(image, label, np.random.default_rng(0), 1.0)
  np.testing.assert_array_equal(blurred_label, label)
  # With sigma 0 and at most 7 taps OpenCV does not sample a Gaussian but uses
  # its fixed table, for 5 taps the binomial [1, 4, 6, 4, 1] / 16; border reflect 101.
  taps = np.array([1, 4, 6, 4, 1]) / 16
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode='reflect')
  rows = sum(t * padded[i:i + 12] for i, t in enumerate(taps))
  expected = sum(t * rows[:, i:i + 15] for i, t in enumerate(taps))
  np.testing.assert_allclose(blurred, expected, atol=1e-3)


def test_normalize_and_eval_resize():
  image = np.full((2, 2, 3), 124.0, np.float32)
  np.testing.assert_allclose(transforms.normalize(image, MEAN, STD)[0, 0],
                             [(124 - 0.485 * 255) / (0.229 * 255),
                              (124 - 0.456 * 255) / (0.224 * 255),
                              (124 - 0.406 * 255) / (0.225 * 255)], atol=1e-6)
  image, label = coded_pair(20, 40)
  resized, resized_label = transforms.eval_resize(image, label, 33, MEAN, IGNORE)
  # Long side 40 -> 33, short side round(16.5) = 16 (semseg uses Python's round),
  # padded 8 rows above and 9 below.
  assert resized.shape == (33, 33, 3) and resized_label.shape == (33, 33)
  assert (resized_label[:8] == IGNORE).all() and (resized_label[24:] == IGNORE).all()
  np.testing.assert_allclose(resized[:8].reshape(-1, 3), np.broadcast_to(MEAN, (8 * 33, 3)),
                             rtol=1e-6)
  np.testing.assert_array_equal(
      resized_label[8:24], cv2.resize(label, (33, 16), interpolation=cv2.INTER_NEAREST))
  tall, tall_label = transforms.eval_resize(*coded_pair(40, 20), 33, MEAN, IGNORE)
  assert (tall_label[:, :8] == IGNORE).all() and (tall_label[:, 8:24] != IGNORE).all()
  assert tall.shape == (33, 33, 3)


@pytest.mark.parametrize('recipe', ['semseg', 'mmseg'])
def test_uint8_crops_are_the_float32_crops_rounded(data_dir, recipe):
  """data.batch_dtype: the float32 crop (normalized on the host, the official values) is the
  reference; the uint8 crop is its RGB rounded, so once normalized it is within half a grey
  level of it (padding included: the mean rounded), with the same labels."""
  config = tiny_config(data_dir)
  config.data.augment.recipe = recipe
  image, label = coded_pair(45, 50)
  image = image.astype(np.uint8)   # decoded images are uint8 (and mmseg's chain insists)
  half_level = 0.5 / min(STD) + 1e-6
  for seed in range(10):
    config.data.batch_dtype = 'float32'
    reference, reference_label = transforms.train_augment(image, label,
                                                          np.random.default_rng(seed), config)
    config.data.batch_dtype = 'uint8'
    out, out_label = transforms.train_augment(image, label, np.random.default_rng(seed), config)
    again = transforms.train_augment(image, label, np.random.default_rng(seed), config)
    np.testing.assert_array_equal(out, again[0])
    assert reference.dtype == np.float32 and out.dtype == np.uint8
    assert out.shape == (33, 33, 3) and out_label.shape == (33, 33)
    np.testing.assert_array_equal(out_label, reference_label)
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {IGNORE}
    denormalized = reference * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
    assert np.abs(out - denormalized).max() <= 0.5 + 1e-3
    np.testing.assert_allclose(transforms.normalize(out, MEAN, STD), reference, rtol=0,
                               atol=half_level)


def test_worker_count_by_the_cores(data_dir, monkeypatch):
  config = tiny_config(data_dir)
  for cores, workers in ((2, 0), (7, 0), (8, 4), (16, 8), (224, 32)):
    monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)))
    config.data.worker_count = -1
    assert pipeline.worker_count(config) == workers, cores
    config.data.worker_count = 3
    assert pipeline.worker_count(config) == 3


# --- loaders ---------------------------------------------------------------------------------


def take(config, first_step, count, process_index=0, process_count=1):
  return list(pipeline.train_batches(config, first_step, first_step + count,
                                     process_index=process_index, process_count=process_count))


def assert_same_batches(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    np.testing.assert_array_equal(batch['image'], other['image'])
    np.testing.assert_array_equal(batch['label'], other['label'])


def test_train_batches_depend_on_the_seed_only(data_dir):
  config = tiny_config(data_dir)
  first = take(config, 0, 3)
  for batch in first:
    assert batch['image'].shape == (6, 33, 33, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (6, 33, 33) and batch['label'].dtype == np.uint8
    assert set(np.unique(batch['label'])) <= set(range(synthetic.NUM_CLASSES)) | {IGNORE}
  assert_same_batches(first, take(config, 0, 3))
  config.seed = 1
  assert not np.array_equal(first[0]['image'], take(config, 0, 1)[0]['image'])


def test_batches_from_a_later_step_are_the_same_batches(data_dir):
  config = tiny_config(data_dir)
  # 12 examples in batches of 6: steps 3 and 4 are in the second epoch.
  assert_same_batches(take(config, 0, 5)[3:], take(config, 3, 2))


def test_process_rows_make_the_global_batch(data_dir):
  config = tiny_config(data_dir)
  whole = take(config, 2, 2)
  for process_count in (2, 3):
    parts = [take(config, 2, 2, index, process_count) for index in range(process_count)]
    joined = [{key: np.concatenate([part[step][key] for part in parts])
               for key in ('image', 'label')} for step in range(2)]
    assert_same_batches(whole, joined)


def test_worker_processes_give_the_in_process_batches(data_dir):
  config = tiny_config(data_dir)
  in_process = take(config, 1, 3)
  config.data.worker_count = 2
  assert_same_batches(in_process, take(config, 1, 3))


def tagged_source(count, size=33, bad_label_at=None):
  """In-memory examples whose image value is their index (labels 0, one bad one if asked)."""
  examples = []
  for index in range(count):
    label = np.zeros((size, size, 1), np.uint8)
    if index == bad_label_at:
      label[3, 4] = 9
    examples.append({'image': np.full((size, size, 3), index, np.uint8), 'label': label,
                     'file_name': f'tagged/{index}.png'.encode()})
  return examples


def indices_of(batch):
  """The tags of a batch's real examples (image value = index, before normalization)."""
  pixels = batch['image'][:, 0, 0, 0] * STD[0] + MEAN[0]
  return np.rint(pixels).astype(int).tolist()


def test_each_epoch_visits_every_example_once_in_a_new_order(monkeypatch, data_dir):
  config = tiny_config(data_dir)
  # No geometry: each output image is its input, so it still carries its index.
  config.data.augment.update(scale_min=1.0, scale_max=1.0, rotate_prob=0.0, blur_prob=0.0,
                             flip_prob=0.0)
  monkeypatch.setattr(pipeline, 'load_split', lambda config, split: tagged_source(14))
  # 14 examples in batches of 6: two batches an epoch, two examples left out of each.
  seen = [indices_of(batch) for batch in take(config, 0, 6)]
  epochs = [seen[0] + seen[1], seen[2] + seen[3], seen[4] + seen[5]]
  for epoch in epochs:
    assert len(set(epoch)) == 12 and set(epoch) <= set(range(14))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_eval_batches_cover_each_example_once(monkeypatch, data_dir):
  config = tiny_config(data_dir)
  monkeypatch.setattr(pipeline, 'load_split', lambda config, split: tagged_source(7))
  for process_count in (1, 2, 3):
    seen, batch_counts = [], set()
    for process_index in range(process_count):
      batches = list(pipeline.eval_batches(config, process_index=process_index,
                                           process_count=process_count))
      # ceil(7 / P) examples per process in batches of 6 / P.
      per_process = -(-7 // process_count)
      assert len(batches) == -(-per_process // (6 // process_count))
      batch_counts.add(len(batches))
      for batch in batches:
        assert batch['image'].shape == (6 // process_count, 33, 33, 3)
        assert batch['label'].shape == (6 // process_count, 33, 33)
        assert batch['valid'].dtype == bool
        tags = indices_of(batch)
        seen += [t for t, valid in zip(tags, batch['valid']) if valid]
        assert (batch['label'][~batch['valid']] == IGNORE).all()
        assert (batch['label'][batch['valid']] == 0).all()
    assert len(batch_counts) == 1
    assert sorted(seen) == list(range(7))


def test_eval_batches_of_the_synthetic_validation_split(data_dir):
  config = tiny_config(data_dir)
  batches = list(pipeline.eval_batches(config, process_index=0, process_count=1))
  assert [b['valid'].sum() for b in batches] == [6, 1]
  assert pipeline.num_examples(config, 'validation') == 7
  for batch in batches:
    labels = batch['label'][batch['valid']]
    assert set(np.unique(labels)) <= set(range(synthetic.NUM_CLASSES)) | {IGNORE}
    assert (labels != IGNORE).any()


def test_out_of_range_label_fails_naming_the_file(monkeypatch, data_dir):
  config = tiny_config(data_dir)
  monkeypatch.setattr(pipeline, 'load_split',
                      lambda config, split: tagged_source(6, bad_label_at=4))
  with pytest.raises(ValueError, match=r'tagged/4\.png.*\[9\]'):
    list(pipeline.eval_batches(config, process_index=0, process_count=1))
  with pytest.raises(ValueError, match=r'tagged/4\.png.*\[9\]'):
    take(config, 0, 1)


def test_image_and_label_sizes_must_match():
  example = {'image': np.zeros((5, 6, 3), np.uint8), 'label': np.zeros((5, 7, 1), np.uint8),
             'file_name': b'odd.png'}
  with pytest.raises(ValueError, match=r'odd\.png.*5x6.*5x7'):
    pipeline.DecodeAndCheck(7, IGNORE).map(example)


def test_missing_real_dataset_names_dataset_dir_and_key(tmp_path):
  config = tiny_config(tmp_path)
  config.data.name = 'ade20k'
  with pytest.raises(FileNotFoundError, match='ade20k') as error:
    take(config, 0, 1)
  assert 'config.data.data_dir' in str(error.value) and str(tmp_path) in str(error.value)


def test_batch_size_must_divide_by_process_count(data_dir):
  config = tiny_config(data_dir)
  with pytest.raises(ValueError, match='train.batch_size=6'):
    take(config, 0, 1, process_count=4)
  with pytest.raises(ValueError, match='eval.batch_size=6'):
    pipeline.eval_batches(config, process_index=0, process_count=4)


def test_a_global_batch_larger_than_the_split_is_refused(monkeypatch, data_dir):
  config = tiny_config(data_dir)
  monkeypatch.setattr(pipeline, 'load_split', lambda config, split: tagged_source(5))
  with pytest.raises(ValueError, match=r'train\.batch_size=6 is larger than the 5 training'):
    take(config, 0, 1)
