"""Model construction from a config: the segmentation network (`build_model`: RefineNet-LW on a
ResNet, or TokenFusion's segmenter on a Mix Transformer, by config.model.backbone) and the
translation generator and discriminator (`build_translation_models`)."""

import jax.numpy as jnp
import ml_collections

from cen_jax import branches as branches_lib
from cen_jax import config as config_lib
from cen_jax.fusion import registry
from cen_jax.models import mit_translation
from cen_jax.models.pix2pix import Discriminator, Generator
from cen_jax.models.refinenet import SeparateBranches, Segmenter
from cen_jax.models.segformer import TokenFusionSegmenter

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MIN_TRANSLATION_SIZE = 32  # the PatchGAN's three stride-2 and two 4x4 stride-1 convs


def build_model(config: ml_collections.ConfigDict, *, axis_name=None, heads=()):
  """The segmentation network of the config; `heads` gives every task its own classifier
  (the dense multitask scenarios, Segmenter.heads; ResNet only)."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}')
  fusion = registry.get(m.fusion)
  family = config_lib.backbone_family(m)
  registry.check_backbone(fusion, m.get('backbone', 'resnet'), family, len(config.modalities))
  if family == 'mit':
    if m.get('remat', 'none') != 'none':
      raise ValueError(f'config.model.remat={m.remat!r}: rematerialisation is built for the '
                       f"ResNet backbone only (config.model.backbone={m.backbone!r})")
    if heads:
      raise ValueError(f'config.model.backbone={m.backbone!r}: task heads (the dense '
                       f"scenarios) are built on the ResNet only (config.model.backbone='resnet')")
    return TokenFusionSegmenter(
        m.num_classes, m.backbone, m.embedding_dim, m.fusion, m.threshold, m.drop_path_rate,
        m.dropout, m.frozen_bn, m.bn_momentum, m.bn_eps, axis_name, DTYPES[m.dtype],
        fusion_options(config), tuple(m.mit_embed_dims), tuple(m.mit_depths),
        tuple(m.mit_sr_ratios))
  fields = dict(
      num_classes=m.num_classes, blocks=config_lib.resnet_blocks(m), fusion=m.fusion,
      threshold=m.threshold, stem_width=m.stem_width, widths=tuple(m.widths),
      decoder_widths=tuple(m.decoder_widths), dropout=m.dropout, frozen_bn=m.frozen_bn,
      bn_momentum=m.bn_momentum, bn_eps=m.bn_eps, axis_name=axis_name, dtype=DTYPES[m.dtype],
      fusion_options=fusion_options(config), heads=tuple(heads),
      remat=m.get('remat', 'none'))
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
  if registry.get(config.model.fusion).network == 'early':
    return ['+'.join(config.modalities)]
  if config.get('branches', ()):
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


def build_translation_models(config: ml_collections.ConfigDict, *, axis_name=None):
  """(generator, discriminator): CEN's pix2pix U-Net and PatchGAN (config.model.backbone
  'unet', the official CEN recipe), or TokenFusion's Mix Transformer gen_bX and dis_bX
  ('mit_b0'..'mit_b5')."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}')
  family = config_lib.translation_family(m)
  registry.check_translation(registry.get(m.fusion), len(config.modalities),
                             m.get('backbone', 'unet'))
  dtype = DTYPES[m.dtype]
  if family == 'mit':
    return build_mit_translation_models(config, dtype)
  generator = Generator(
      ngf=m.ngf, num_downs=translation_num_downs(config), fusion=m.fusion,
      threshold=m.threshold, dropout=m.dropout, in_momentum=m.in_momentum, in_eps=m.in_eps,
      axis_name=axis_name, dtype=dtype, fusion_options=fusion_options(config))
  discriminator = Discriminator(ndf=m.ndf, in_momentum=m.in_momentum, in_eps=m.in_eps,
                                axis_name=axis_name, dtype=dtype)
  return generator, discriminator


def mit_overrides(m) -> dict:
  """The MiT arch fields a config overrides (config.model.mit_*; () keeps the official)."""
  fields = dict(embed_dims=m.mit_embed_dims, depths=m.mit_depths, sr_ratios=m.mit_sr_ratios)
  return {k: tuple(v) for k, v in fields.items() if v}


def build_mit_translation_models(config, dtype):
  """TokenFusion's gen_bX / dis_bX for config.model.backbone 'mit_bX'."""
  m = config.model
  if config.data.crop_size % 32:
    raise ValueError(f'config.data.crop_size={config.data.crop_size}: the MiT generator '
                     f'needs a multiple of 32 (five stride-2 patch embeddings)')
  arch = m.backbone[len('mit_'):]
  common = dict(mit_overrides(m), drop_path_rate=m.drop_path_rate, dtype=dtype)
  generator = mit_translation.mit_generator(arch, fusion=m.fusion, threshold=m.threshold,
                                            fusion_options=fusion_options(config), **common)
  return generator, mit_translation.mit_discriminator(arch, **common)
