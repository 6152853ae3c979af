"""PSPNet model family: PyTorch-exact layers, dilated ResNets, PSPNet heads, and CascadePSP's
refinement module.

Imports nothing else of pspnet_jax; `create_model` reads a config duck-typed.
"""

import jax.numpy as jnp
from flax import nnx

from pspnet_jax.models.cascadepsp import RefinementModule
from pspnet_jax.models.layers import PRECISIONS
from pspnet_jax.models.pspnet import PSPNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(config, *, rngs: nnx.Rngs) -> PSPNet | RefinementModule:
  """The PSPNet that `config.model` and `config.data.num_classes` describe, freshly initialized;
  CascadePSP's refinement module when `config.task` is 'refinement' (configs/cascadepsp.py)."""
  model_config = config.model
  if getattr(config, 'task', 'segmentation') == 'refinement':
    return RefinementModule(backbone=model_config.backbone,
                            widths=tuple(model_config.refine_widths),
                            dtype=DTYPES[model_config.dtype],
                            resize_precision=PRECISIONS[model_config.resize_precision],
                            rngs=rngs)
  return PSPNet(config.data.num_classes, backbone=model_config.backbone,
                deep_stem=model_config.deep_stem, stem_widths=tuple(model_config.stem_widths),
                output_stride=model_config.output_stride,
                contract_dilation=model_config.contract_dilation,
                dilate_basic_conv2=model_config.dilate_basic_conv2,
                use_ppm=model_config.use_ppm, ppm_bins=tuple(model_config.ppm_bins),
                ppm_align_corners=model_config.ppm_align_corners,
                head_channels=model_config.head_channels,
                aux_channels=model_config.aux_channels, dropout=model_config.dropout,
                zoom_factor=model_config.zoom_factor, align_corners=model_config.align_corners,
                dtype=DTYPES[model_config.dtype], logits_dtype=DTYPES[model_config.logits_dtype],
                resize_precision=PRECISIONS[model_config.resize_precision],
                remat=model_config.remat, rngs=rngs)


def dropout_streams(config) -> nnx.State:
  """The dropout streams (nnx.RngState) of the model `create_model(config, ...)` builds.

  Checkpoints do not hold them: every train step reseeds them from (seed,
  step) and evaluation never draws from them. Called under `jax.jit`, only
  this part of the initialization is left after XLA drops the unused rest.
  """
  return nnx.state(create_model(config, rngs=nnx.Rngs(config.seed)), nnx.RngState)
