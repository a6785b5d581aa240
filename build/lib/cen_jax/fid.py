"""FID and KID in JAX: pytorch-fid's FID InceptionV3 in Flax, streamed statistics, the official
formulas.

The network is pytorch-fid's `InceptionV3([3])` (the port of TF's 2015-12-05 Inception used by
the FID papers, as the official CEN `utils/inception.py`): torchvision's Inception3 with the FID
blocks (average pools that ignore padding in Mixed_5b..Mixed_7b, a max pool in Mixed_7c's pool
branch), BatchNorm eps 1e-3, inputs in [0, 1] bilinearly resized to 299x299 (F.interpolate,
align_corners=False, no antialiasing) and scaled to [-1, 1]; features: the 2048-d global average
(pool3). Module names equal the torch state_dict names, so `import_weights` is a rename and a
transpose.

FID (`frechet_distance`) and KID (`kid`) follow the official `image2image_translation/utils/
fid_kid.py`: scipy sqrtm with the eps = 1e-6 diagonal fallback; unbiased MMD^2 with the kernel
(<x, y> / d + 1)^3 over 50 subsets of min(1000, n) drawn generated-then-real per subset, the mean
reported x100. Statistics are streamed (`FeatureStats`: count, sum and Gram in float64 on host).

The official writes every image as a matplotlib PNG (per-image min-max stretch to 0..255, 500x500)
and reads it back; evaluation here applies the same per-image stretch and 8-bit truncation on
device (`stretch_to_unit_range`) but feeds the image at its own size (no 500x500 re-rendering).
"""

import functools
import os
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299  # pytorch-fid resizes every input to 299x299 (tests may shrink it for speed)
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision BasicConv2d
NUM_FID_CLASSES = 1008  # the FID network's (unused) classifier: tells it from torchvision's
KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000
FID_EPS = 1e-6
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_PRECISION = jax.lax.Precision.HIGHEST  # TF32/bf16 convolutions would move FID


# ----------------------------------------------------------------------------- network

def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """torchvision BasicConv2d: conv (no bias) -> BatchNorm (running statistics) -> ReLU."""
  features: int
  kernel: tuple | int
  stride: int = 1
  padding: tuple | int = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def avg_pool_excluding_padding(x):
  """3x3, stride 1, padding 1, count_include_pad=False (TF's average pool)."""
  window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


def max_pool(x, stride: int, padding: int = 0):
  """3x3 max pool (torch MaxPool2d / F.max_pool2d: floor mode, -inf padding)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), pad)


class InceptionA(nn.Module):  # FIDInceptionA
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name='branch1x1')(x)
    b5 = BasicConv(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, 1, name='branch_pool')(avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a (torchvision InceptionB)

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name='branch3x3')(x)
    bd = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):  # FIDInceptionC
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, 1, name='branch1x1')(x)
    b7 = BasicConv(c, 1, name='branch7x7_1')(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, 1, name='branch_pool')(avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a (torchvision InceptionD)

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, 3, stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool='avg', padding excluded) or FIDInceptionE_2 (pool='max')."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name='branch1x1')(x)
    b3 = BasicConv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = BasicConv(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)],
                         -1)
    pooled = avg_pool_excluding_padding(x) if self.pool == 'avg' else max_pool(x, 1, 1)
    bp = BasicConv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """[N, 299, 299, 3] in [-1, 1] -> [N, 2048] pool3 features (pytorch-fid block 3)."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = max_pool(x, 2)
    x = BasicConv(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, 3, name='Conv2d_4a_3x3')(x)
    x = max_pool(x, 2)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of F.interpolate(mode='bilinear', align_corners=False) along one axis."""
  from cen_jax import layers
  return layers.interpolation_matrix(in_size, out_size, 'bilinear')


def resize_bilinear(images, size: int):
  """[N, H, W, C] -> [N, size, size, C] as F.interpolate(bilinear, align_corners=False)."""
  h, w = images.shape[1:3]
  if (h, w) == (size, size):
    return images
  rows, cols = jnp.asarray(bilinear_matrix(h, size)), jnp.asarray(bilinear_matrix(w, size))
  x = jnp.einsum('oh,nhwc->nowc', rows, images, precision=_PRECISION)
  return jnp.einsum('pw,nowc->nopc', cols, x, precision=_PRECISION)


def features(variables, images, *, input_size: int | None = None):
  """pool3 features [N, 2048] of images [N, H, W, 3] in [0, 1] (pytorch-fid's forward)."""
  x = resize_bilinear(images.astype(jnp.float32), input_size or INPUT_SIZE)
  return FIDInceptionV3().apply(variables, 2.0 * x - 1.0)


def stretch_to_unit_range(images, *, quantize: bool = True):
  """[..., H, W, 3] in any range -> [0, 1] as the official's saved PNGs: per-image min-max
  stretch to 0..255, truncated to 8 bits (astype(np.uint8); quantize=False keeps the
  continuous values), read back / 255."""
  axes = (-3, -2, -1)
  low = jnp.min(images, axis=axes, keepdims=True)
  span = jnp.max(images, axis=axes, keepdims=True) - low
  stretched = (images - low) * 255.0 / jnp.where(span > 0, span, 1.0)
  return (jnp.floor(stretched) if quantize else stretched) / 255.0


# ----------------------------------------------------------------------------- weights

@functools.lru_cache(maxsize=1)
def template_variables() -> dict:
  """Shapes of the variables (the input size does not change them; 75 is Inception's minimum)."""
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


def random_variables(seed: int = 0) -> dict:
  """Random float32 variables for tests (FID itself needs the imported weights): He-normal
  kernels and BN statistics/affines near identity, so features keep a useful scale. NumPy, as
  jitting Flax's initialisers for 94 convolutions takes minutes on CPU."""
  rng = np.random.default_rng(seed)
  draw = {'kernel': lambda s: rng.normal(0, np.sqrt(2 / np.prod(s[:3])), s),
          'scale': lambda s: rng.uniform(0.5, 1.5, s), 'bias': lambda s: rng.normal(0, 0.1, s),
          'mean': lambda s: rng.normal(0, 0.1, s), 'var': lambda s: rng.uniform(0.5, 1.5, s)}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: draw[path[-1].key](leaf.shape).astype(np.float32),
      template_variables())


_LEAF_TO_TORCH = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                  ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                  ('batch_stats', 'var'): 'running_var'}


def torch_key(collection: str, path: tuple) -> str:
  """('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel')) -> 'Mixed_5b.branch1x1.conv.weight'."""
  return '.'.join(path[:-1] + (_LEAF_TO_TORCH[collection, path[-1]],))


def _leaves(variables):
  for collection, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      yield collection, tuple(p.key for p in path), leaf


def _torch_layout(array):
  return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array  # HWIO -> OIHW


def export_state_dict(variables) -> dict:
  """{torch key: array} as pytorch-fid's weight file (convolutions OIHW), with the FID
  classifier fc (zeros) so it loads strictly into pytorch-fid's network (tests)."""
  out = {torch_key(c, p): np.asarray(_torch_layout(np.asarray(leaf)), np.float32)
         for c, p, leaf in _leaves(variables)}
  out['fc.weight'] = np.zeros((NUM_FID_CLASSES, FEATURE_DIM), np.float32)
  out['fc.bias'] = np.zeros((NUM_FID_CLASSES,), np.float32)
  return out


def import_state_dict(state_dict: dict, source: str) -> dict:
  """Flax variables from pytorch-fid's state_dict; a one-line ValueError naming `source` when it
  is not that network (a missing key, a shape that differs, or torchvision's 1000-class
  ImageNet InceptionV3 instead of the 1008-class FID one)."""
  def not_fid(why):
    return ValueError(f'{source}: not the pytorch-fid FID InceptionV3 weights '
                      f'(pt_inception-2015-12-05-*.pth): {why}')
  fc = state_dict.get('fc.weight')
  if fc is None or tuple(fc.shape) != (NUM_FID_CLASSES, FEATURE_DIM):
    raise not_fid(f'fc.weight is {None if fc is None else tuple(fc.shape)}, expected '
                  f'{(NUM_FID_CLASSES, FEATURE_DIM)}')
  variables = {}
  for collection, path, leaf in _leaves(template_variables()):
    key = torch_key(collection, path)
    if key not in state_dict:
      raise not_fid(f'no {key!r}')
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != tuple(_torch_layout(np.empty(leaf.shape, np.bool_)).shape):
      raise not_fid(f'{key!r} has shape {value.shape}')
    node = variables.setdefault(collection, {})
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
  return variables


def npz_path_for(weights_path: str) -> str:
  return os.path.splitext(weights_path)[0] + '.npz'


def load_weights(path: str) -> dict:
  """Flax variables from the pytorch-fid weight file (.pth, needs torch; converted once to a
  sibling .npz that later runs read without torch) or from that .npz."""
  from cen_jax import torch_io
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.eval.inception_weights: {path!r} does not exist '
                            f'(pytorch-fid pt_inception-2015-12-05-*.pth or its .npz)')
  cached = npz_path_for(path)
  if not path.endswith('.npz') and os.path.isfile(cached) and (
      os.path.getmtime(cached) >= os.path.getmtime(path)):
    path = cached
  variables = import_state_dict(torch_io.load_state_dict(path), path)
  if not path.endswith('.npz'):
    try:  # convert once; a read-only folder only costs torch next time
      torch_io.convert_pth_to_npz(path, cached)
    except OSError as e:
      print(f'fid: could not write {cached} ({e.strerror}); the .pth will be read again next '
            f'time', file=sys.stderr)
  return variables


def weights_fingerprint(variables) -> str:
  """A short identity of the weights (the real-statistics cache is valid only for them)."""
  total = sum(float(np.abs(np.asarray(leaf, np.float64)).sum()) for _, _, leaf in
              _leaves(variables))
  return f'{total:.10e}'


# ----------------------------------------------------------------------------- statistics

class FeatureStats(NamedTuple):
  """Streamed first and second moments of features, float64 on host."""
  count: int
  total: np.ndarray  # [d] sum of features
  gram: np.ndarray  # [d, d] sum of outer products


def empty_stats(dim: int = FEATURE_DIM) -> FeatureStats:
  return FeatureStats(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def add_features(stats: FeatureStats, feats) -> FeatureStats:
  f = np.asarray(feats, np.float64).reshape(-1, stats.total.shape[0])
  return FeatureStats(stats.count + f.shape[0], stats.total + f.sum(0), stats.gram + f.T @ f)


def stats_of(feats) -> FeatureStats:
  feats = np.asarray(feats)
  return add_features(empty_stats(feats.shape[-1]), feats)


def mean_and_covariance(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
  """The sample mean and the unbiased covariance (np.cov(rowvar=False)) of the features."""
  if stats.count < 2:
    raise ValueError(f'FID needs at least 2 images, got {stats.count}')
  mu = stats.total / stats.count
  sigma = (stats.gram - stats.count * np.outer(mu, mu)) / (stats.count - 1)
  return mu, sigma


def _sqrtm(a):
  from scipy import linalg
  out = linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), retrying with eps on the diagonals when
  the product's square root is not finite (the official's fallback)."""
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    print(f'fid: singular covariance product; adding {eps} to the diagonals', file=sys.stderr)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'fid: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(S1 S2)')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(generated: FeatureStats, real: FeatureStats) -> float:
  return frechet_distance(*mean_and_covariance(generated), *mean_and_covariance(real))


def polynomial_kernel(x, y):
  """(<x, y> / d + 1)^3 in float64 (sklearn's defaults as the official calls it)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x, y) -> float:
  """Unbiased MMD^2 of equal-sized samples: mean off-diagonal k(x, x') and k(y, y') minus
  twice the mean k(x, y)."""
  m = x.shape[0]
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  off_diagonal = (k_xx.sum(1) - np.diagonal(k_xx)).sum() + (k_yy.sum(1) - np.diagonal(k_yy)).sum()
  return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum(0).sum() / (m * m))


def kid_subsets(n_generated: int, n_real: int, *, seed: int = 0, n_subsets: int = KID_SUBSETS,
                subset_size: int = KID_SUBSET_SIZE) -> list:
  """(generated, real) index arrays per subset, drawn as the official (np.random.choice without
  replacement, generated then real) from RandomState(seed)."""
  size = min(subset_size, n_generated, n_real)
  rng = np.random.RandomState(seed)
  return [(rng.choice(n_generated, size, replace=False), rng.choice(n_real, size, replace=False))
          for _ in range(n_subsets)]


def kid(generated, real, *, seed: int = 0, n_subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE) -> float:
  """KID x100: the mean unbiased MMD^2 over the official random subsets."""
  g, r = np.asarray(generated, np.float64), np.asarray(real, np.float64)
  if min(len(g), len(r)) < 2:
    raise ValueError(f'KID needs at least 2 images per set, got {len(g)} and {len(r)}')
  mmds = [unbiased_mmd2(g[gi], r[ri]) for gi, ri in
          kid_subsets(len(g), len(r), seed=seed, n_subsets=n_subsets, subset_size=subset_size)]
  return float(np.mean(mmds) * 100)


# ----------------------------------------------------------------------------- folders

def list_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder!r} is not a folder of images')
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if len(files) < 2:
    raise ValueError(f'{folder!r}: FID/KID need at least 2 .png/.jpg images, found {len(files)}')
  return files


def read_unit_image(path: str) -> np.ndarray:
  """[H, W, 3] float32 in [0, 1]: the first three channels / 255 (the official reading)."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      image = image.convert('RGBA' if 'A' in image.getbands() else 'RGB')
      array = np.asarray(image)[..., :3]
  except OSError as e:
    raise ValueError(f'{path}: not a readable image ({e})') from None
  return array.astype(np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def _jitted_features(input_size: int):
  return jax.jit(functools.partial(features, input_size=input_size))


def folder_features(folder: str, variables, *, batch_size: int = 50) -> np.ndarray:
  """[n, 2048] features of a folder's images (batches of equal-sized images)."""
  forward = _jitted_features(INPUT_SIZE)
  files = list_images(folder)
  out = []
  for start in range(0, len(files), batch_size):
    images = [read_unit_image(f) for f in files[start:start + batch_size]]
    by_shape = {}
    for i, image in enumerate(images):
      by_shape.setdefault(image.shape, []).append(i)
    feats = np.zeros((len(images), FEATURE_DIM), np.float32)
    for indices in by_shape.values():
      feats[indices] = np.asarray(forward(variables, np.stack([images[i] for i in indices])))
    out.append(feats)
  return np.concatenate(out)


def compare_folders(dir_a: str, dir_b: str, weights: str, *, seed: int = 0) -> dict:
  """{'fid', 'kid'} between two folders of images (dir_a as the generated set), as the
  official calculate_given_paths on them."""
  if not weights:
    raise ValueError('--mode=fid needs --config.eval.inception_weights=FILE (pytorch-fid '
                     'pt_inception-2015-12-05-*.pth or its .npz)')
  variables = load_weights(weights)
  a, b = folder_features(dir_a, variables), folder_features(dir_b, variables)
  return {'fid': fid_from_stats(stats_of(a), stats_of(b)), 'kid': kid(a, b, seed=seed)}
