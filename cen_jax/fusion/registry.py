"""Fusions as pure functions, registered by name and chosen by `config.model.fusion`.

A fusion says what happens to the branch-stacked activations `x: [M, N, H, W, C]` at named
points of a block, which blocks it acts in, the regulariser it brings, and which network it
needs. The networks call `apply_point` at every point and never test a fusion's name, so a
new fusion is one registered function (docs/fusions.md):

    from cen_jax.fusion import ops, registry

    @registry.point_fn
    def soft_exchange(x, site):                     # x: [M, N, H, W, C]; site: Site
      keep = jax.nn.sigmoid(jnp.abs(site.scale) / site.threshold - 1.0)   # [M, C]
      keep = keep[:, None, None, None, :]
      return keep * x + (1 - keep) * ops.mean_of_others(x)

    registry.register('soft_exchange', points={'bn2': soft_exchange, 'norm': soft_exchange},
                      penalty=registry.partitioned_l1)

Points (where `apply_point` is called):
- ResNet bottleneck (segmentation): 'bn1' (after bn1, before its ReLU), 'act1' (after that
  ReLU), 'bn2' (after bn2, before its ReLU), 'act2', 'output' (the block's output).
- U-Net encoder block (translation): 'norm' (after the private InstanceNorm).
- Mix Transformer (MiT, segmentation with config.model.backbone 'mit_b0'..'mit_b5'), per block
  `block{s}_{i}`: 'tokens' (inside the attention, after `proj`: the attention's output,
  before the residual; `Site.scores` holds the block's token scores [M, N, H, W], computed by
  per-branch score predictors that the MiT builds only for a fusion with `token_scores=True`),
  'norm2' (after the private LayerNorm norm2, before the Mix-FFN; `Site.scale` is its [M, C]
  scale); per stage: 'stage_end' (after the stage's final private LayerNorm norm{s}, so the
  decoder and the next stage both see it; `Site.block` is 'norm{s}', `Site.scale` its scale).
  The MiT translation generator (cen_jax/models/mit_translation.py) has the same points in
  its ENCODER only (blocks `block_enc_{s}_{i}`, stage ends `norm_enc_{s}`); there only the
  last block of each stage has scores, the others get `Site.scores` None.

`Site` carries what a fusion may read there: the block's name and place in its stage, the
scale [M, C] of the private norm just applied (at 'bn1', 'bn2', 'norm'), `threshold`, the
fusion's own options (`config.model.fusion_options`) and `carry`, what the fusion's earlier
points of the same block returned (a point function may return `(x, carry_update)`).

The penalty (`penalty(scales_list, options) -> scalar`) is applied by the train step to the
scales of the norms at the exchange point (bn2 of every bottleneck; the encoder
InstanceNorms; norm2 of every MiT block), weighted by `config.train.l1_lambda`. A fusion with
`penalty_input='token_scores'` gets instead the token scores of every MiT block (the model's
outputs['masks'], this device's examples), summed over the global batch as the official
TokenFusion loss.

A fusion fits a backbone ('resnet' or 'mit') when its network is one that backbone builds
('shared' for the MiT) and it has no points or at least one of that backbone's
(`check_backbone`; token scores exist only in the MiT).

Networks: 'shared' (one set of convolutions for all branches, private norms: CEN's),
'separate' (every branch its own convolutions: M independent networks and the late
ensemble) and 'early' (the inputs concatenated along channels into one branch).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cen_jax.fusion import ops

RESNET_POINTS = ('bn1', 'act1', 'bn2', 'act2', 'output')
UNET_POINTS = ('norm',)
MIT_POINTS = ('tokens', 'norm2', 'stage_end')
POINTS = RESNET_POINTS + UNET_POINTS + MIT_POINTS
NETWORKS = ('shared', 'separate', 'early')
BACKBONE_POINTS = {'resnet': RESNET_POINTS, 'mit': MIT_POINTS}
BACKBONE_NETWORKS = {'resnet': NETWORKS, 'mit': ('shared',)}
PENALTY_INPUTS = ('norm_scales', 'token_scores')


@dataclasses.dataclass(frozen=True)
class Site:
  """What a fusion may read at one point of one block."""
  block: str  # module name, e.g. 'layer2_3', 'conv4', 'block3_1' or 'norm3' (MiT stage end)
  stage: int  # ResNet / MiT stage (0..3); 0 in the U-Net
  index: int  # block index within its stage (U-Net: encoder level; MiT stage end: the last)
  num_blocks: int  # blocks in this stage (U-Net: encoder levels)
  threshold: float
  options: Mapping[str, Any]
  scale: Optional[jax.Array] = None  # [M, C] scale of the norm just applied
  carry: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  point: str = ''  # the point being applied (set by apply_point)
  scores: Optional[jax.Array] = None  # MiT 'tokens': the block's token scores [M, N, H, W]

  @property
  def last_in_stage(self) -> bool:
    return self.index == self.num_blocks - 1


def every_block(site: Site) -> bool:
  del site
  return True


@dataclasses.dataclass(frozen=True)
class Fusion:
  name: str
  points: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  where: Callable[[Site], bool] = every_block
  penalty: Optional[Callable] = None  # (scales_list, options) -> scalar
  network: str = 'shared'
  max_branches: int = 0  # 0: any number
  description: str = ''
  monitor_scales: bool = False  # log the fraction of partitioned scales under the threshold
  token_scores: bool = False  # the MiT builds score predictors and hands their scores over
  penalty_input: str = 'norm_scales'  # what `penalty` reads: 'norm_scales' | 'token_scores'


REGISTRY: dict[str, Fusion] = {}


def register(name: str, *, points: Optional[Mapping[str, Callable]] = None,
             where: Callable[[Site], bool] = every_block, penalty: Optional[Callable] = None,
             network: str = 'shared', max_branches: int = 0, description: str = '',
             monitor_scales: Optional[bool] = None, token_scores: bool = False,
             penalty_input: str = 'norm_scales') -> Fusion:
  """Registers (or replaces) the fusion `name`; returns it. `monitor_scales` (default: when
  its penalty reads norm scales) logs `scales_below_threshold/<branch>` during training;
  `token_scores` asks the MiT for token scores (logged as `tokens_below_threshold/<branch>`),
  `penalty_input='token_scores'` hands them to the penalty."""
  points = dict(points or {})
  unknown = sorted(set(points) - set(POINTS))
  if unknown:
    raise ValueError(f'fusion {name!r}: unknown points {unknown}; expected some of {POINTS}')
  if network not in NETWORKS:
    raise ValueError(f'fusion {name!r}: network={network!r}, expected one of {NETWORKS}')
  if network != 'shared' and points:
    raise ValueError(f'fusion {name!r}: a {network!r} network has no fusion points')
  if penalty_input not in PENALTY_INPUTS:
    raise ValueError(f'fusion {name!r}: penalty_input={penalty_input!r}, expected one of '
                     f'{PENALTY_INPUTS}')
  if penalty_input == 'token_scores' and not token_scores:
    raise ValueError(f"fusion {name!r}: penalty_input='token_scores' needs token_scores=True")
  if monitor_scales is None:
    monitor_scales = penalty is not None and penalty_input == 'norm_scales'
  fusion = Fusion(name, points, where, penalty, network, max_branches, description,
                  monitor_scales, token_scores, penalty_input)
  REGISTRY[name] = fusion
  return fusion


def get(name: str) -> Fusion:
  if name not in REGISTRY:
    raise ValueError(f'config.model.fusion={name!r}: expected one of {sorted(REGISTRY)} (or '
                     f'register it with cen_jax.fusion.registry.register, e.g. in a module named '
                     f'by config.model.fusion_module)')
  return REGISTRY[name]


def point_fn(fn: Callable) -> Callable:
  """Marks a point function (documentation only; any `fn(x, site)` works)."""
  return fn


def apply_point(fusion: Fusion, point: str, x: jax.Array, site: Site,
                carry: dict) -> tuple[jax.Array, dict]:
  """Runs `fusion` at `point` of a block: returns (x, carry) for the block's next points."""
  fn = fusion.points.get(point)
  site = dataclasses.replace(site, point=point)
  if fn is None or not fusion.where(site):
    return x, carry
  out = fn(x, dataclasses.replace(site, carry=dict(carry)))
  if isinstance(out, tuple):
    x, update = out
    carry = {**carry, **update}
  else:
    x = out
  return x, carry


class BlockPoints:
  """A block's points in order: `points(name, x, scale)` runs the fusion at point `name` (with
  `scale`, the [M, C] scale of the norm just applied, if any) and keeps the carry for the
  block's later points."""

  def __init__(self, fusion: Fusion, site: Site):
    self.fusion, self.site, self.carry = fusion, site, {}

  def __call__(self, point: str, x: jax.Array, scale: Optional[jax.Array] = None) -> jax.Array:
    x, self.carry = apply_point(self.fusion, point, x,
                                dataclasses.replace(self.site, scale=scale), self.carry)
    return x


def check_branches(fusion: Fusion, num_branches: int) -> None:
  if fusion.max_branches and num_branches > fusion.max_branches:
    raise ValueError(f'fusion {fusion.name!r} is defined for at most {fusion.max_branches} '
                     f'branches, got {num_branches}')


def fits_backbone(fusion: Fusion, family: str) -> bool:
  """Whether `fusion` acts in a backbone family ('resnet' | 'mit'): a network it builds, and no
  points or at least one of its points (token scores only in the MiT)."""
  points = BACKBONE_POINTS[family]
  return (fusion.network in BACKBONE_NETWORKS[family]
          and (not fusion.points or any(p in points for p in fusion.points))
          and (family == 'mit' or not fusion.token_scores))


def check_backbone(fusion: Fusion, backbone: str, family: str, num_branches: int) -> None:
  """Refuses, in one line, a fusion that does not fit the backbone (`fits_backbone`) or the
  number of branches."""
  check_branches(fusion, num_branches)
  if not fits_backbone(fusion, family):
    fitting = sorted(n for n, f in REGISTRY.items() if fits_backbone(f, family))
    raise ValueError(f'config.model.fusion={fusion.name!r} does not fit config.model.backbone='
                     f'{backbone!r}: it has network={fusion.network!r}, points='
                     f'{sorted(fusion.points)}, where this backbone builds networks '
                     f'{list(BACKBONE_NETWORKS[family])} with points '
                     f'{list(BACKBONE_POINTS[family])}; fusions that fit: {", ".join(fitting)}')
  if fusion.token_scores and num_branches < 2:
    raise ValueError(f'fusion {fusion.name!r} exchanges tokens between branches: got '
                     f'{num_branches} branch(es), expected at least 2')


def check_translation(fusion: Fusion, num_branches: int, backbone: str = 'unet') -> None:
  """The translation generator offers the point 'norm' of a shared U-Net, or (backbone
  'mit_b0'..'mit_b5') the MiT points of its encoder."""
  if backbone != 'unet':
    check_backbone(fusion, backbone, 'mit', num_branches)
    return
  check_branches(fusion, num_branches)
  if (fusion.network != 'shared' or (fusion.points and 'norm' not in fusion.points)
      or fusion.token_scores):
    raise ValueError(f'config.model.fusion={fusion.name!r}: translation needs a fusion of the '
                     f"shared network with a 'norm' point (or none); this one has "
                     f'network={fusion.network!r}, points={sorted(fusion.points)}')


def penalty(fusion: Fusion, scales_list, options) -> jax.Array:
  """The fusion's regulariser of `scales_list`: the norm scales at the exchange point, or,
  for `penalty_input='token_scores'`, the token scores of every MiT block."""
  if fusion.penalty is None:
    return jnp.zeros((), jnp.float32)
  return jnp.asarray(fusion.penalty(scales_list, options), jnp.float32)


def device_penalty(fusion: Fusion, norm_scales, token_scores, options,
                   num_devices) -> tuple[jax.Array, Any]:
  """(the fusion's penalty as one device computes it, what that device divides it by).

  Norm scales are replicated, so every device computes the whole penalty and takes 1/D of it;
  token scores (TokenFusion) cover this device's examples, so their sum over the devices is
  the official sum over the global batch and each device takes all of its own."""
  if fusion.penalty_input == 'token_scores':
    return penalty(fusion, token_scores, options), 1
  return penalty(fusion, norm_scales, options), num_devices


# ----------------------------------------------------------------------------- penalties

def partitioned_l1(scales_list, options=None) -> jax.Array:
  """CEN: L1 on a disjoint part of each branch's scales (`fusion.sparsity_masks`)."""
  del options
  return ops.l1_penalty(scales_list)


def all_channels_l1(scales_list, options=None) -> jax.Array:
  """Ablation: L1 on every scale of every branch (no partition)."""
  del options
  return sum((jnp.sum(jnp.abs(s.astype(jnp.float32))) for s in scales_list),
             jnp.zeros((), jnp.float32))


def token_scores_l1(masks, options=None) -> jax.Array:
  """TokenFusion: the official sum of |score| over every block's token scores."""
  del options
  return ops.mask_l1(masks)


# ----------------------------------------------------------------------------- point functions

def exchange_by_scale(x, site: Site):
  """CEN: channels whose |scale| < threshold take the mean of the other branches."""
  return ops.exchange(x, site.scale, site.threshold)


def random_exchange_mask(block: str, num_branches: int, num_channels: int,
                         fraction: float, seed: int) -> np.ndarray:
  """Boolean [M, C], fixed per block: within branch m's partition (as CEN's penalty), each
  channel is exchanged with probability `fraction`. A constant, so training and evaluation
  see the same exchange, and two branches never exchange the same channel."""
  rng = np.random.default_rng([seed, zlib.crc32(block.encode())])
  draw = rng.random((num_branches, num_channels)) < fraction
  return draw & ops.sparsity_masks(num_branches, num_channels)


def random_exchange(x, site: Site):
  """Ablation: exchange a fixed random subset of channels (`options['random_fraction']` of
  each branch's partition), whatever the scales."""
  num, channels = x.shape[0], x.shape[-1]
  if num == 1:
    return x
  exchanged = random_exchange_mask(site.block, num, channels,
                                   float(site.options.get('random_fraction', 0.5)),
                                   int(site.options.get('random_seed', 0)))
  keep = jnp.asarray(~exchanged).reshape((num,) + (1,) * (x.ndim - 2) + (channels,))
  return jnp.where(keep, x, ops.mean_of_others(x).astype(x.dtype))


def average_branches(x, site: Site):
  """Ablation: every branch continues from the mean of all branches."""
  del site
  return jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape).astype(x.dtype)


def sum_branches(x, site: Site):
  """Ablation: every branch continues from the sum of all branches."""
  del site
  return jnp.broadcast_to(jnp.sum(x, axis=0, keepdims=True), x.shape).astype(x.dtype)


def asym_shuffle_and_shift(x, site: Site):
  """AsymFusion, after the first ReLU: keep the pixel shift of the pre-shuffle features for
  the second point, then shuffle channels between the two branches."""
  del site
  if x.shape[0] == 1:  # the official ops act only between two branches
    return x
  return ops.channel_shuffle(x), {'shift': ops.pixel_shift(x)}


def asym_add_shift_and_shuffle(x, site: Site):
  """AsymFusion, after the second ReLU: add the other branch's shifted features, shuffle."""
  if x.shape[0] == 1:
    return x
  return ops.channel_shuffle(x + site.carry['shift'][::-1])


def asym_shuffle_and_shift_once(x, site: Site):
  """AsymFusion at a MiT stage end or after a U-Net encoder norm (cen-jax's own placement,
  docs/fusions.md): both ops in one step, each branch gets the channel shuffle of x (its
  first S = 4 * (C // 5) channels, the other's last C - S) plus the other branch's
  pixel-shifted x (zero on the last C - S)."""
  del site
  if x.shape[0] == 1:
    return x
  return ops.channel_shuffle(x) + ops.pixel_shift(x)[::-1]


ASYM_UNET_MAX_STRIDE = 32  # the deepest ResNet stage end the official AsymFusion acts at


def asym_blocks(site: Site) -> bool:
  """Official AsymFusion: the last bottleneck of each stage, never a stage's first block;
  on the MiT, every stage end. In the U-Net (cen-jax's own placement, docs/fusions.md) the
  normed encoder levels of stride 4 to 32, the strides of the official's four ResNet stage ends:
  encoder level `index` (conv{index + 1}) has stride 2^(index + 1). Deeper levels are 4x4 or
  smaller at the official 256x256, where a one-pixel shift moves most features off the map."""
  if site.point == 'stage_end':
    return True
  if site.point == 'norm':
    return 2 ** (site.index + 1) <= ASYM_UNET_MAX_STRIDE
  return site.index >= 1 and site.last_in_stage


def token_fusion(x, site: Site):
  """TokenFusion, after the attention's proj: scale every token by its score, then exchange
  the tokens scored under the threshold (official 0.02). A block without scores
  (`site.scores` None) passes x unchanged: the official translation generator
  (cen_jax/models/mit_translation.py) scores only the last block of each encoder stage and
  runs the others with mask=None."""
  scores = site.scores
  if scores is None:
    return x
  return ops.token_exchange(x * scores[..., None].astype(x.dtype), scores, site.threshold)


def stage_ends(site: Site) -> bool:
  return site.last_in_stage


# ----------------------------------------------------------------------------- the registry

register('none', description='shared convolutions, private norms, late ensemble only')
CEN_POINTS = {'bn2': exchange_by_scale, 'norm': exchange_by_scale, 'norm2': exchange_by_scale}
register('cen', points=CEN_POINTS, penalty=partitioned_l1,
         description='CEN: exchange by |scale| < threshold, L1 on a disjoint partition')
register('asymfusion', points={'act1': asym_shuffle_and_shift,
                               'act2': asym_add_shift_and_shuffle,
                               'stage_end': asym_shuffle_and_shift_once,
                               'norm': asym_shuffle_and_shift_once},
         where=asym_blocks, max_branches=2,
         description='AsymFusion: channel shuffle + pixel shift, last block of each stage')
register('cen_no_l1', points=CEN_POINTS,
         monitor_scales=True, description='CEN exchange without the sparsity penalty')
register('cen_l1_all', points=CEN_POINTS,
         penalty=all_channels_l1,
         description='CEN exchange with the L1 on all channels (no partition)')
register('cen_l1_only', penalty=partitioned_l1,
         description="CEN's L1 on the partition without the exchange (what the penalty alone "
                     'costs)')
register('random_exchange', points={'bn2': random_exchange, 'norm': random_exchange,
                                    'norm2': random_exchange},
         description='exchange a fixed random part of each partition (fusion_options.'
                     'random_fraction)')
register('average', points={'output': average_branches}, where=stage_ends,
         description='branches averaged after each stage')
register('sum', points={'output': sum_branches}, where=stage_ends,
         description='branches summed after each stage')
register('separate', network='separate',
         description='no sharing: each branch its own convolutions, late ensemble')
register('early', network='early',
         description='early fusion: inputs concatenated along channels, one branch')
register('tokenfusion', points={'tokens': token_fusion}, penalty=token_scores_l1,
         token_scores=True, penalty_input='token_scores',
         description='TokenFusion (MiT): tokens scaled by their score, exchanged under the '
                     'threshold; L1 on the scores')


def load_user_module(name: str) -> None:
  """Imports `name` (a module path or a .py file) so its `register` calls run."""
  if not name:
    return
  import importlib
  import importlib.util
  import os
  if name.endswith('.py'):
    if not os.path.isfile(name):
      raise ValueError(f'config.model.fusion_module={name!r}: file not found')
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(name))[0], name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f'config.model.fusion_module={name!r}: cannot import ({e})') from None
