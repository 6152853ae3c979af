"""configuration.resume_changes on checkpoints written before a config key existed."""

import json

import pytest

from configs import demo
from pspnet_jax import configuration


def saved_config_without(*keys) -> dict:
  saved = json.loads(demo.get_config().to_json())
  for key in keys:
    *sections, name = key.split('.')   # 'task' is top level
    parent = saved
    for section in sections:
      parent = parent[section]
    del parent[name]
  return saved


def test_a_checkpoint_older_than_a_key_resumes_when_the_key_keeps_the_old_computation():
  saved = saved_config_without(*configuration.ADDED_KEYS)
  assert configuration.resume_changes(saved, demo.get_config()) == []


def test_a_checkpoint_older_than_a_key_refuses_a_value_that_changes_the_computation():
  saved = saved_config_without('model.logits_dtype')
  config = demo.get_config()
  config.model.logits_dtype = 'bfloat16'
  with pytest.raises(ValueError, match=r"model.logits_dtype: 'float32' -> 'bfloat16'"):
    configuration.resume_changes(saved, config)


def test_every_added_key_exists_with_its_old_value_as_the_default():
  flat = configuration.flatten_config(json.loads(demo.get_config().to_json()))
  assert {key: flat[key] for key in configuration.ADDED_KEYS} == configuration.ADDED_KEYS
