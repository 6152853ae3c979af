"""Evaluation: the confusion matrix of a model's predictions over a dataset split.

The step is a pure function of the model's variables (not the training
state) and a global batch, under `jax.jit` with the variables replicated and
the batch sharded over `data`; the loop sums its confusion matrices over
every batch of the split, and the metrics come from that dataset-level
matrix (`metrics.segmentation_metrics`), as semseg computes them.

The periodic evaluation during training uses the `whole` protocol of
`pipeline.eval_batches`: each image resized so its long side is
data.crop_size, padded to the crop, one forward pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import metrics, sharding
from pspnet_jax.data import pipeline


def eval_step(variables: nnx.State, batch: dict, *, graphdef: nnx.GraphDef, num_classes: int,
              ignore_label: int) -> jax.Array:
  """Confusion matrix of the eval-mode model's argmax on a (global) batch."""
  model = nnx.merge(graphdef, variables)
  predictions = jnp.argmax(model(batch['image']), axis=-1)
  return metrics.confusion_matrix(predictions, batch['label'], num_classes, ignore_label)


def jit_eval_step(mesh, *, graphdef: nnx.GraphDef, config):
  """eval_step under jit: variables replicated, batch sharded over `data`."""
  step_fn = functools.partial(eval_step, graphdef=graphdef, num_classes=config.data.num_classes,
                              ignore_label=config.data.ignore_label)
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_fn, variables: nnx.State, config, mesh) -> dict:
  """Dataset-level metrics of `config.data.eval_split` (see metrics.segmentation_metrics)."""
  num_classes = config.data.num_classes
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for batch in pipeline.eval_batches(config):
    # Padding examples carry only ignore labels, so they add nothing to the counts.
    del batch['valid']
    confusion += np.asarray(eval_fn(variables, sharding.to_global(batch, mesh)), np.int64)
  return metrics.segmentation_metrics(confusion)
