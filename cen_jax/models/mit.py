"""Mix Transformer (MiT-B0..B5, SegFormer's encoder) for M parallel branches, with TokenFusion.

The official TokenFusion RGB-D segmenter (yikaiw/TokenFusion semantic_segmentation/models/
mix_transformer.py, modules.py) on branch-stacked tensors `[M, N, H, W, C]`; tokens stay in
this spatial layout (the official [B, H W, C] is its row-major flattening).

- Every Linear and Conv is shared by all branches (official `ModuleParallel`) and runs as ONE
  op over all of them: `nn.Dense` contracts the last axis of [M, N, H, W, C]; convolutions fold
  M into the batch (`layers.fold`).
- Every LayerNorm of the encoder is private (official `LayerNormParallel`, eps 1e-6): params
  stacked [M, C] by `layers.per_branch`.
- Fusions come from the registry (cen_jax/fusion/registry.py), called at the MiT points:
  'tokens' (inside the attention, after `proj`), 'norm2' (after every block's private norm2)
  and 'stage_end' (after each stage's final norm{s}); the network never tests a fusion's name.
- TokenFusion (`fusion='tokenfusion'`, a fusion with `token_scores`): each stage has one score
  predictor (`PredictorLG`), with its OWN weights per branch (official `score_nets`, an
  nn.ModuleList of one MLP per branch, LayerNorm eps 1e-5), run before every block of its stage
  on that block's input tokens; the score of a token is softmax(log_softmax(logits))[0]. At
  'tokens' the output of `proj` is multiplied by the score and a token whose score is <
  `threshold` (official 0.02) is replaced by the other branch's (`ops.token_exchange`). The
  scores are returned so the loss can take its L1 (`ops.mask_l1`, official `lamda` 1e-4).
  `fusion='none'` has no points and no predictor: a plain multimodal SegFormer with shared
  weights and private LayerNorms.

Official behaviours kept: GELU is exact (erf); q/kv/proj have biases (qkv_bias=True in every
mit_bX); the spatial-reduction conv (kernel = stride = sr_ratio) + its LayerNorm (eps 1e-6,
private) feed the keys and values when sr_ratio > 1; stochastic depth rates rise linearly from 0
to `drop_path_rate` over all blocks (the mit_bX classes fix it at 0.1), one independent draw per
branch and sample; dropout rates are 0 in every mit_bX. Weight init as the official
`_init_weights`: Linear N(0, 0.02) (timm's trunc_normal_ cuts at +-2 absolute, i.e. never),
bias 0; Conv N(0, sqrt(2 / fan_out)), fan_out = k*k*C_out / groups, bias 0; LayerNorm 1, 0.

Torch key names: cen_jax/tokenfusion_io.py.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cen_jax.fusion import registry
from cen_jax.fusion.ops import mask_l1, token_exchange  # noqa: F401  (this module's API too)
from cen_jax.layers import per_branch, fastest_conv, fold, unfold

MASK_THRESHOLD = 0.02  # official Attention.forward: TokenExchange(..., mask_threshold=0.02)
LN_EPS = 1e-6  # official LayerNormParallel
PREDICTOR_LN_EPS = 1e-5  # official PredictorLG: a plain nn.LayerNorm

_WIDE = (64, 128, 320, 512)
# Official mit_b0..b5 (num_heads (1, 2, 5, 8), mlp_ratios 4, sr_ratios (8, 4, 2, 1) in all).
MIT_ARCHS = {
    'mit_b0': dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'mit_b1': dict(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    'mit_b2': dict(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    'mit_b3': dict(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    'mit_b4': dict(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    'mit_b5': dict(embed_dims=_WIDE, depths=(3, 6, 40, 3)),
}


def linear_init():
  return nn.initializers.normal(0.02)


def conv_init(fan_out: int):
  return nn.initializers.normal(float(np.sqrt(2.0 / fan_out)))


@jax.custom_vjp
def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., I] @ kernel [I, O], whose kernel gradient sums over the tokens of a materialised x.

  XLA's own gradient transposes x to [I, tokens] and fuses x's producer into that transpose:
  for the Mix-FFN's fc2 the exact GELU was computed there, in column order, 265 ms per
  [256, 16384] map of MiT-B1 at 256x256 (30% of the step, benchmarks/profile_step.py). Behind
  the barrier x is read as it is stored, and the transposed-left matmul runs in Eigen."""
  return jnp.dot(x, kernel)


def _token_matmul_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _token_matmul_bwd(residuals, g):
  x, kernel = residuals
  dx = jnp.dot(g, kernel.T)
  rows = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]))
  dk = jax.lax.dot_general(rows, g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


token_matmul.defvjp(_token_matmul_fwd, _token_matmul_bwd)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None, **kwargs):
  """nn.Dense's dot_general (contract x's last axis with the kernel's first) as token_matmul."""
  del precision, kwargs
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
  return token_matmul(x, kernel)


def dense(features: int, name: str, use_bias: bool = True, dtype=jnp.float32) -> nn.Dense:
  """A Linear shared by every branch (one dot over all leading axes)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=linear_init(),
                  bias_init=nn.initializers.zeros, dot_general=_dense_dot_general, name=name)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis (two-pass variance, float32 statistics)."""
  epsilon: float = LN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


# Official LayerNormParallel: one LayerNorm per branch, params [M, C].
PrivateLayerNorm = per_branch(LayerNorm)


class Conv(nn.Module):
  """A torch Conv2d with bias shared by all branches, official MiT init (bias 0)."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', conv_init(k * k * self.features),
                        (k, k, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = fastest_conv(fold(x).astype(self.dtype), kernel.astype(self.dtype), self.stride,
                     self.padding)
    return unfold(y + bias.astype(self.dtype), x.shape[0])


class DepthwiseConv(nn.Module):
  """torch Conv2d(C, C, 3, 1, 1, groups=C) with bias (official DWConv), shared by all branches.

  Computed as nine shifted multiply-adds rather than a grouped convolution: on XLA:CPU at
  [4, 64, 64, 128] (the B0 stage-1 Mix-FFN at 256x256) 8 against 112 ms forward, 115 against
  529 ms forward + backward (2-core Xeon, busy). Kernel [3, 3, 1, C]: torch's [C, 1, 3, 3] in
  HWIO, as a grouped conv's.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param('kernel', conv_init(9), (3, 3, 1, channels)).astype(self.dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,)).astype(self.dtype)
    h, w = x.shape[-3], x.shape[-2]
    pads = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    padded = jnp.pad(x.astype(self.dtype), pads)
    out = bias
    for i in range(3):
      for j in range(3):
        out = out + padded[..., i:i + h, j:j + w, :] * kernel[i, j, 0]
    return out


def stochastic_depth(x: jax.Array, rate: float, rng) -> jax.Array:
  """timm DropPath on [M, N, ...]: one keep draw per branch and sample, kept ones / (1 - rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, x.shape[:2] + (1,) * (x.ndim - 2))
  return x / keep * mask.astype(x.dtype)


class ScoreNet(nn.Module):
  """One branch's token scorer (official PredictorLG.score_nets[m]):
  LayerNorm (eps 1e-5), Linear C, GELU, Linear C/2, GELU, Linear C/4, GELU, Linear 2, LogSoftmax.
  Returns the log-probabilities [..., 2]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = LayerNorm(PREDICTOR_LN_EPS, dtype=self.dtype, name='norm')(x)
    for i, width in enumerate((c, c // 2, c // 4)):
      x = jax.nn.gelu(dense(width, f'fc{i + 1}', dtype=self.dtype)(x), approximate=False)
    logits = dense(2, 'fc4', dtype=self.dtype)(x).astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


# Per-branch weights (stacked [M, ...]); still one batched matmul per layer for all branches.
PrivateScoreNet = per_branch(ScoreNet)


def token_scores(log_probs: jax.Array) -> jax.Array:
  """The official mask: softmax over the two log-probabilities, first entry. [...]."""
  return jax.nn.softmax(log_probs, axis=-1)[..., 0]


def attention(q, k, v, drop_rate: float = 0.0, rng=None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over [M, N, tokens, heads, d], logits and softmax in float32.
  Through `jax.nn.dot_product_attention` (a fused kernel where the platform has one; on CPU the
  same einsums), except with attention dropout, which it does not offer (every official
  mit_bX has attn_drop_rate 0)."""
  m, n = q.shape[:2]
  if drop_rate == 0.0:
    fold_ = lambda t: t.reshape((m * n,) + t.shape[2:])
    out = jax.nn.dot_product_attention(fold_(q), fold_(k), fold_(v))
    return out.reshape(q.shape)
  logits = jnp.einsum('mnqhd,mnkhd->mnhqk', q, k,
                      preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  attn = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - drop_rate, attn.shape)
  attn = jnp.where(keep, attn / (1.0 - drop_rate), 0.0).astype(q.dtype)
  return jnp.einsum('mnhqk,mnkhd->mnqhd', attn, v)


class Attention(nn.Module):
  """Efficient self-attention with spatial reduction; its output goes through `fuse` (the
  block's 'tokens' point: TokenFusion's scaling and exchange)."""
  dim: int
  num_heads: int
  sr_ratio: int
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, fuse, *, train: bool) -> jax.Array:
    m, n, h, w, c = x.shape
    heads, head_dim = self.num_heads, c // self.num_heads
    q = dense(c, 'q', self.qkv_bias, self.dtype)(x).reshape(m, n, h * w, heads, head_dim)
    if self.sr_ratio > 1:
      r = self.sr_ratio
      x = Conv(c, r, r, 0, dtype=self.dtype, name='sr')(x)
      x = PrivateLayerNorm(LN_EPS, dtype=self.dtype, name='norm')(x)
    kv = dense(2 * c, 'kv', self.qkv_bias, self.dtype)(x).reshape(m, n, -1, 2, heads, head_dim)
    k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    out = attention(q, k, v, self.attn_drop if train else 0.0,
                    self.make_rng('dropout') if train and self.attn_drop > 0 else None)
    out = dense(c, 'proj', dtype=self.dtype)(out.reshape(m, n, h, w, c))
    out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
    return fuse(out)


class MixFFN(nn.Module):
  """fc1, depth-wise 3x3 conv, exact GELU, dropout, fc2, dropout (official Mlp)."""
  hidden: int
  drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dim = x.shape[-1]
    y = dense(self.hidden, 'fc1', dtype=self.dtype)(x)
    y = jax.nn.gelu(DepthwiseConv(dtype=self.dtype, name='dwconv')(y), approximate=False)
    y = nn.Dropout(self.drop, deterministic=not train)(y)
    y = dense(dim, 'fc2', dtype=self.dtype)(y)
    return nn.Dropout(self.drop, deterministic=not train)(y)


class Block(nn.Module):
  """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))); norms private. The
  fusion acts at 'tokens' (the attention's output, reading `scores`) and 'norm2'."""
  dim: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  threshold: float = MASK_THRESHOLD
  dtype: Any = jnp.float32
  fusion: str = 'tokenfusion'  # a registered fusion
  fusion_options: tuple = ()  # (key, value) pairs: Site.options
  stage: int = 0
  index: int = 0
  num_blocks: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, scores, *, train: bool) -> jax.Array:
    norm = lambda name: PrivateLayerNorm(LN_EPS, dtype=self.dtype, name=name)
    at = registry.BlockPoints(registry.get(self.fusion), registry.Site(
        self.name, self.stage, self.index, self.num_blocks, self.threshold,
        dict(self.fusion_options), scores=scores))

    def path(f):  # the residual branch, through stochastic depth when training
      if train and self.drop_path > 0:
        return stochastic_depth(f, self.drop_path, self.make_rng('dropout'))
      return f

    attn = Attention(self.dim, self.num_heads, self.sr_ratio, self.qkv_bias, self.attn_drop,
                     self.drop, dtype=self.dtype, name='attn')
    x = x + path(attn(norm('norm1')(x), lambda out: at('tokens', out), train=train))
    norm2 = norm('norm2')
    y = at('norm2', norm2(x), norm2.variables['params']['scale'])
    mlp = MixFFN(int(self.dim * self.mlp_ratio), self.drop, dtype=self.dtype, name='mlp')
    return x + path(mlp(y, train=train))


class OverlapPatchEmbed(nn.Module):
  """Conv (kernel k, stride s, padding k // 2) then a private LayerNorm (eps 1e-6)."""
  features: int
  patch_size: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(self.features, self.patch_size, self.stride, self.patch_size // 2,
             dtype=self.dtype, name='proj')(x)
    return PrivateLayerNorm(LN_EPS, dtype=self.dtype, name='norm')(x)


class MixVisionTransformer(nn.Module):
  """The multimodal MiT encoder. Input [M, N, H, W, C_in]. Returns (features, masks):
  features, the four stage outputs [M, N, H_s, W_s, embed_dims[s]] (strides 4, 8, 16, 32);
  masks, one token score map [M, N, H_s, W_s] per block in order (empty with fusion 'none').

  Module names (torch names in cen_jax/tokenfusion_io.py): patch_embed{s}, score_predictor_{s-1},
  block{s}_{i} (norm1, attn/{q, kv, sr, norm, proj}, norm2, mlp/{fc1, dwconv, fc2}), norm{s}.
  """
  embed_dims: Sequence[int] = (32, 64, 160, 256)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (4, 4, 4, 4)
  depths: Sequence[int] = (2, 2, 2, 2)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  fusion: str = 'tokenfusion'  # a registered fusion that fits the MiT (registry.check_backbone)
  threshold: float = MASK_THRESHOLD
  dtype: Any = jnp.float32
  fusion_options: tuple = ()  # (key, value) pairs: Site.options

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[list, list]:
    fusion = check_fusion(self.fusion, x.shape[0])
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    features, masks, cur = [], [], 0
    for s, depth in enumerate(self.depths):
      first = s == 0
      x = OverlapPatchEmbed(self.embed_dims[s], 7 if first else 3, 4 if first else 2,
                            dtype=self.dtype, name=f'patch_embed{s + 1}')(x)
      predictor = None
      if fusion.token_scores:
        predictor = PrivateScoreNet(dtype=self.dtype, name=f'score_predictor_{s}')
      for i in range(depth):
        scores = None
        if predictor is not None:
          scores = token_scores(predictor(x))
          masks.append(scores)
        block = Block(self.embed_dims[s], self.num_heads[s], self.mlp_ratios[s],
                      self.sr_ratios[s], self.qkv_bias, self.drop_rate, self.attn_drop_rate,
                      float(rates[cur + i]), self.threshold, dtype=self.dtype,
                      fusion=self.fusion, fusion_options=self.fusion_options, stage=s,
                      index=i, num_blocks=depth, name=f'block{s + 1}_{i}')
        x = block(x, scores, train=train)
      cur += depth
      norm = PrivateLayerNorm(LN_EPS, dtype=self.dtype, name=f'norm{s + 1}')
      x = norm(x)
      site = registry.Site(f'norm{s + 1}', s, depth - 1, depth, self.threshold,
                           dict(self.fusion_options), scale=norm.variables['params']['scale'])
      x, _ = registry.apply_point(fusion, 'stage_end', x, site, {})
      features.append(x)
    return features, masks


def check_fusion(fusion: str, num_branches: int, backbone: str = 'mit') -> registry.Fusion:
  """The registered fusion `fusion` if it fits the MiT with `num_branches` branches (one-line
  error otherwise, registry.check_backbone)."""
  found = registry.get(fusion)
  registry.check_backbone(found, backbone, 'mit', num_branches)
  return found


def mit(backbone: str, **fields) -> MixVisionTransformer:
  """The official `mit_b0` .. `mit_b5` encoder (fields override, e.g. fusion, drop_path_rate)."""
  if backbone not in MIT_ARCHS:
    raise ValueError(f'backbone={backbone!r}: expected one of {sorted(MIT_ARCHS)}')
  return MixVisionTransformer(**{**MIT_ARCHS[backbone], **fields})
