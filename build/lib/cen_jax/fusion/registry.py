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

`Site` carries what a fusion may read there: the block's name and place in its stage, the
scale [M, C] of the private norm just applied (at 'bn1', 'bn2', 'norm'), `threshold`, the
fusion's own options (`config.model.fusion_options`) and `carry`, what the fusion's earlier
points of the same block returned (a point function may return `(x, carry_update)`).

The penalty (`penalty(scales_list, options) -> scalar`) is applied by the train step to the
scales of the norms at the exchange point (bn2 of every bottleneck; the encoder
InstanceNorms), weighted by `config.train.l1_lambda`.

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
POINTS = RESNET_POINTS + UNET_POINTS
NETWORKS = ('shared', 'separate', 'early')


@dataclasses.dataclass(frozen=True)
class Site:
  """What a fusion may read at one point of one block."""
  block: str  # module name, e.g. 'layer2_3' or 'conv4'
  stage: int  # ResNet stage (0..3); 0 in the U-Net
  index: int  # block index within its stage (U-Net: encoder level)
  num_blocks: int  # blocks in this stage (U-Net: encoder levels)
  threshold: float
  options: Mapping[str, Any]
  scale: Optional[jax.Array] = None  # [M, C] scale of the norm just applied
  carry: Mapping[str, Any] = dataclasses.field(default_factory=dict)

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


REGISTRY: dict[str, Fusion] = {}


def register(name: str, *, points: Optional[Mapping[str, Callable]] = None,
             where: Callable[[Site], bool] = every_block, penalty: Optional[Callable] = None,
             network: str = 'shared', max_branches: int = 0, description: str = '',
             monitor_scales: Optional[bool] = None) -> Fusion:
  """Registers (or replaces) the fusion `name`; returns it. `monitor_scales` (default: when
  it has a penalty) logs `scales_below_threshold/<branch>` during training."""
  points = dict(points or {})
  unknown = sorted(set(points) - set(POINTS))
  if unknown:
    raise ValueError(f'fusion {name!r}: unknown points {unknown}; expected some of {POINTS}')
  if network not in NETWORKS:
    raise ValueError(f'fusion {name!r}: network={network!r}, expected one of {NETWORKS}')
  if network != 'shared' and points:
    raise ValueError(f'fusion {name!r}: a {network!r} network has no fusion points')
  if monitor_scales is None:
    monitor_scales = penalty is not None
  fusion = Fusion(name, points, where, penalty, network, max_branches, description,
                  monitor_scales)
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
  if fn is None or not fusion.where(site):
    return x, carry
  out = fn(x, dataclasses.replace(site, carry=dict(carry)))
  if isinstance(out, tuple):
    x, update = out
    carry = {**carry, **update}
  else:
    x = out
  return x, carry


def check_branches(fusion: Fusion, num_branches: int) -> None:
  if fusion.max_branches and num_branches > fusion.max_branches:
    raise ValueError(f'fusion {fusion.name!r} is defined for at most {fusion.max_branches} '
                     f'branches, got {num_branches}')


def check_translation(fusion: Fusion, num_branches: int) -> None:
  """The translation generator offers the point 'norm' of a shared U-Net."""
  check_branches(fusion, num_branches)
  if fusion.network != 'shared' or (fusion.points and 'norm' not in fusion.points):
    raise ValueError(f'config.model.fusion={fusion.name!r}: translation needs a fusion of the '
                     f"shared network with a 'norm' point (or none); this one has "
                     f'network={fusion.network!r}, points={sorted(fusion.points)}')


def penalty(fusion: Fusion, scales_list, options) -> jax.Array:
  if fusion.penalty is None:
    return jnp.zeros((), jnp.float32)
  return jnp.asarray(fusion.penalty(scales_list, options), jnp.float32)


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


def asym_blocks(site: Site) -> bool:
  """Official AsymFusion: the last bottleneck of each stage, never a stage's first block."""
  return site.index >= 1 and site.last_in_stage


def stage_ends(site: Site) -> bool:
  return site.last_in_stage


# ----------------------------------------------------------------------------- the registry

register('none', description='shared convolutions, private norms, late ensemble only')
register('cen', points={'bn2': exchange_by_scale, 'norm': exchange_by_scale},
         penalty=partitioned_l1,
         description='CEN: exchange by |scale| < threshold, L1 on a disjoint partition')
register('asymfusion', points={'act1': asym_shuffle_and_shift,
                               'act2': asym_add_shift_and_shuffle},
         where=asym_blocks, max_branches=2,
         description='AsymFusion: channel shuffle + pixel shift, last block of each stage')
register('cen_no_l1', points={'bn2': exchange_by_scale, 'norm': exchange_by_scale},
         monitor_scales=True, description='CEN exchange without the sparsity penalty')
register('cen_l1_all', points={'bn2': exchange_by_scale, 'norm': exchange_by_scale},
         penalty=all_channels_l1,
         description='CEN exchange with the L1 on all channels (no partition)')
register('cen_l1_only', penalty=partitioned_l1,
         description="CEN's L1 on the partition without the exchange (what the penalty alone "
                     'costs)')
register('random_exchange', points={'bn2': random_exchange, 'norm': random_exchange},
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
