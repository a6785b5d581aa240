"""Pure functions over the models' parameter trees: the norm scales at the exchange point, the
encoder/decoder split of the official optimisers, parameter counts."""

import re

import jax

# Path (joined with '/') of the scale of every norm at the exchange point: bn2 of each
# bottleneck, norm2 of each MiT block (the scales a fusion's penalty and the threshold
# statistics read).
EXCHANGE_SCALE_PATH = re.compile(r'^encoder/(layer\d+_\d+/bn2|block\d+_\d+/norm2)/scale$')
# Translation: every encoder InstanceNorm scale, conv1..convN (the official slim list); in the
# MiT generator, norm2 of every encoder block (where 'cen' exchanges).
TRANSLATION_SCALE_PATH = re.compile(r'^conv(\d+)/insnorm_conv/scale$')
MIT_TRANSLATION_SCALE_PATH = re.compile(r'^block_enc_(\d+)_(\d+)/norm2/scale$')
SEPARATE_ENCODER_PATH = re.compile(r'^branch\d+/encoder/')  # fusion 'separate'


def translation_exchange_scales(g_params) -> list:
  """The [M, C] scale of every encoder InstanceNorm, conv1..convN in module order, including
  the never-applied conv1 and convN norms: the official slim list. With `fusion.l1_penalty`
  this is the official slim penalty (for M = 2, insnorm_0 -> first half of the channels,
  insnorm_1 -> second half, exactly `fusion.sparsity_masks`)."""
  return [leaf for _, leaf in named_translation_exchange_scales(g_params)]


def named_translation_exchange_scales(g_params) -> list:
  """[('convK', [M, C] encoder InstanceNorm scale)], K = 1..N; for the MiT generator
  [('block_enc_S_I', [M, C] norm2 scale)] of every encoder block, in network order."""
  flat = [(path_str(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(g_params)[0]]
  found = [(int(match[1]), leaf) for path, leaf in flat
           if (match := TRANSLATION_SCALE_PATH.match(path))]
  if found:
    return [(f'conv{k}', leaf) for k, leaf in sorted(found, key=lambda item: item[0])]
  blocks = [((int(match[1]), int(match[2])), leaf) for path, leaf in flat
            if (match := MIT_TRANSLATION_SCALE_PATH.match(path))]
  return [(f'block_enc_{s}_{i}', leaf) for (s, i), leaf in sorted(blocks, key=lambda b: b[0])]


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def exchange_scales(params) -> list:
  """The [M, C] scales of every exchanging norm (bn2 of each bottleneck, norm2 of each MiT
  block), in the order of the flattened tree."""
  return [leaf for _, leaf in named_exchange_scales(params)]


def named_exchange_scales(params) -> list:
  """[(block name, [M, C] scale)] of every bottleneck's bn2 (MiT: every block's norm2), in the
  order of the flattened tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(path_str(path).split('/')[1], leaf) for path, leaf in flat
          if EXCHANGE_SCALE_PATH.match(path_str(path))]


def is_encoder(path: str) -> bool:
  """Encoder/decoder split of the official optimisers (regex `.*conv1.*|.*bn1.*|.*layer.*`
  on torch names selects exactly the ResNet; the decoder group holds the rest and alpha)."""
  return SEPARATE_ENCODER_PATH.match(path) is not None or path.startswith('encoder/')


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
