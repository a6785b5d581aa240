"""Model construction from a config (segmentation: `build_model`; translation:
`build_translation_models`), and pure functions over the models' parameter trees."""

import re

import jax
import jax.numpy as jnp
import ml_collections

from cen_jax import config as config_lib
from cen_jax import fusions
from cen_jax.models.pix2pix import Discriminator, Generator
from cen_jax.models.refinenet import SeparateBranches, Segmenter

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Path (joined with '/') of the scale of every norm at the exchange point: bn2 of each
# bottleneck (the scales a fusion's penalty and the threshold statistics read).
EXCHANGE_SCALE_PATH = re.compile(r'^encoder/layer\d+_\d+/bn2/scale$')
# Translation: every encoder InstanceNorm scale, conv1..convN (the official slim list).
TRANSLATION_SCALE_PATH = re.compile(r'^conv(\d+)/insnorm_conv/scale$')
SEPARATE_ENCODER_PATH = re.compile(r'^branch\d+/encoder/')  # fusion 'separate'
MIN_TRANSLATION_SIZE = 32  # the PatchGAN's three stride-2 and two 4x4 stride-1 convs


def build_model(config: ml_collections.ConfigDict, *, axis_name=None, heads=()) -> Segmenter:
  """The segmentation network of the config; `heads` gives every task its own classifier
  (the dense multitask scenarios, Segmenter.heads)."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}')
  fusion = fusions.get(m.fusion)
  fusions.check_branches(fusion, len(config.modalities))
  fields = dict(
      num_classes=m.num_classes, blocks=config_lib.resnet_blocks(m), fusion=m.fusion,
      threshold=m.threshold, stem_width=m.stem_width, widths=tuple(m.widths),
      decoder_widths=tuple(m.decoder_widths), dropout=m.dropout, frozen_bn=m.frozen_bn,
      bn_momentum=m.bn_momentum, bn_eps=m.bn_eps, axis_name=axis_name, dtype=DTYPES[m.dtype],
      fusion_options=fusion_options(config), heads=tuple(heads))
  if fusion.network == 'separate':
    return SeparateBranches(Segmenter, dict(fields, fusion='none'))
  return Segmenter(**fields)


def fusion_options(config) -> tuple:
  """config.model.fusion_options as sorted (key, value) pairs (a hashable module field)."""
  options = config.model.get('fusion_options', None)
  return tuple(sorted(options.to_dict().items())) if options else ()


def branch_names(config) -> list:
  """The network's branches: one per modality (named by it), one 'a+b' branch for early
  fusion, or the 'input>task' names of config.branches (cen_jax/branches.py)."""
  if fusions.get(config.model.fusion).network == 'early':
    return ['+'.join(config.modalities)]
  if config.get('branches', ()):
    from cen_jax import branches as branches_lib
    return [b.name for b in branches_lib.of_config(config)]
  return list(config.modalities)


def translation_num_downs(config: ml_collections.ConfigDict) -> int:
  """U-Net depth: config.model.num_downs, or log2(config.data.crop_size) when it is 0."""
  size, num_downs = config.data.crop_size, config.model.num_downs
  if num_downs == 0:
    if size < MIN_TRANSLATION_SIZE or size & (size - 1):
      raise ValueError(f'config.data.crop_size={size}: expected a power of two >= '
                       f'{MIN_TRANSLATION_SIZE} (the U-Net depth is log2 of it), or set '
                       f'config.model.num_downs')
    return size.bit_length() - 1
  if num_downs < 3 or size < MIN_TRANSLATION_SIZE or size % 2 ** num_downs:
    raise ValueError(f'config.data.crop_size={size} with config.model.num_downs={num_downs}: '
                     f'expected num_downs >= 3 and crop_size >= {MIN_TRANSLATION_SIZE} '
                     f'divisible by 2^num_downs')
  return num_downs


def build_translation_models(config: ml_collections.ConfigDict, *,
                             axis_name=None) -> tuple[Generator, Discriminator]:
  """(Generator, Discriminator) of the official CEN translation recipe (translation_config)."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}')
  fusions.check_translation(fusions.get(m.fusion), len(config.modalities))
  dtype = DTYPES[m.dtype]
  generator = Generator(
      ngf=m.ngf, num_downs=translation_num_downs(config), fusion=m.fusion,
      threshold=m.threshold, dropout=m.dropout, in_momentum=m.in_momentum, in_eps=m.in_eps,
      axis_name=axis_name, dtype=dtype, fusion_options=fusion_options(config))
  discriminator = Discriminator(ndf=m.ndf, in_momentum=m.in_momentum, in_eps=m.in_eps,
                                axis_name=axis_name, dtype=dtype)
  return generator, discriminator


def translation_exchange_scales(g_params) -> list:
  """The [M, C] scale of every encoder InstanceNorm, conv1..convN in module order, including
  the never-applied conv1 and convN norms: the official slim list. With `fusion.l1_penalty`
  this is the official slim penalty (for M = 2, insnorm_0 -> first half of the channels,
  insnorm_1 -> second half, exactly `fusion.sparsity_masks`)."""
  return [leaf for _, leaf in named_translation_exchange_scales(g_params)]


def named_translation_exchange_scales(g_params) -> list:
  """[('convK', [M, C] encoder InstanceNorm scale)], K = 1..N."""
  flat = jax.tree_util.tree_flatten_with_path(g_params)[0]
  found = [(int(match[1]), leaf) for path, leaf in flat
           if (match := TRANSLATION_SCALE_PATH.match(path_str(path)))]
  return [(f'conv{k}', leaf) for k, leaf in sorted(found, key=lambda item: item[0])]


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def exchange_scales(params) -> list:
  """The [M, C] scales of every exchanging norm (bn2 of each bottleneck), in module order."""
  return [leaf for _, leaf in named_exchange_scales(params)]


def named_exchange_scales(params) -> list:
  """[(block name, [M, C] bn2 scale)] of every bottleneck, in module order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(path_str(path).split('/')[1], leaf) for path, leaf in flat
          if EXCHANGE_SCALE_PATH.match(path_str(path))]


def is_encoder(path: str) -> bool:
  """Encoder/decoder split of the official optimisers (regex `.*conv1.*|.*bn1.*|.*layer.*`
  on torch names selects exactly the ResNet; the decoder group holds the rest and alpha)."""
  return SEPARATE_ENCODER_PATH.match(path) is not None or path.startswith('encoder/')


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
