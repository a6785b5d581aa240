"""Model construction from a config, and pure functions over the model's parameter tree."""

import re

import jax
import jax.numpy as jnp
import ml_collections

from cen_jax import config as config_lib
from cen_jax.models.refinenet import Segmenter

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Path (joined with '/') of the scale of every norm that exchanges: bn2 of each bottleneck.
EXCHANGE_SCALE_PATH = re.compile(r'^encoder/layer\d+_\d+/bn2/scale$')


def build_model(config: ml_collections.ConfigDict, *, axis_name=None) -> Segmenter:
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}')
  return Segmenter(
      num_classes=m.num_classes, blocks=config_lib.resnet_blocks(m), fusion=m.fusion,
      threshold=m.threshold, stem_width=m.stem_width, widths=tuple(m.widths),
      decoder_widths=tuple(m.decoder_widths), dropout=m.dropout, frozen_bn=m.frozen_bn,
      bn_momentum=m.bn_momentum, bn_eps=m.bn_eps, axis_name=axis_name, dtype=DTYPES[m.dtype])


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def exchange_scales(params) -> list:
  """The [M, C] scales of every exchanging norm (bn2 of each bottleneck), in module order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [leaf for path, leaf in flat if EXCHANGE_SCALE_PATH.match(path_str(path))]


def is_encoder(path: str) -> bool:
  """Encoder/decoder split of the official optimisers (regex `.*conv1.*|.*bn1.*|.*layer.*`
  on torch names selects exactly the ResNet; the decoder group holds the rest and alpha)."""
  return path.startswith('encoder/')


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
