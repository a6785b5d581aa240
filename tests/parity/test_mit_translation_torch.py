"""The TokenFusion translation networks (cen_jax/models/mit_translation.py; keys:
cen_jax/tokenfusion_io.py) against tests/helpers/torch_reference_mit_translation.py, the official
MixVisionTransformerGen / Dis written from the official code.

Tiny widths (embed_dims (8, 16, 16, 32, 32), depths (1, 2, 1, 1, 2), the official num_heads,
sr_ratios and mlp_ratio), M = 2, N = 2, 64x64 inputs, random weights, stochastic depth off. The
last Linear of every score net is scaled up so that some scores fall under the official 0.02
and tokens are really exchanged; for 'cen' some norm2 scales are set under the threshold.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import tokenfusion_io
from cen_jax.models import count_params
from cen_jax.models import mit_translation as mt
from cen_jax.models.mit import MASK_THRESHOLD

torch = pytest.importorskip('torch')
from tests.helpers import torch_reference_mit_translation as ref  # noqa: E402  (needs torch)

EMBED_DIMS = (8, 16, 16, 32, 32)
DEPTHS = (1, 2, 1, 1, 2)
SIZE, BATCH = 64, 2
CEN_THRESHOLD = 0.02


def torch_gen(seed, fusion):
  """Reference generator: LayerNorm affines randomised (branches differ), score nets' last
  Linear ~ N(0, 20) with bias (0, 1) (seed 0: 30% and 100% of the 32x32 stage's tokens
  exchanged in branches 0 and 1, fewer deeper); for 'cen' a quarter of every norm2 scale under
  the threshold."""
  torch.manual_seed(seed)
  model = ref.MixVisionTransformerGen(EMBED_DIMS, DEPTHS, drop_path_rate=0.0, fusion=fusion,
                                      cen_threshold=CEN_THRESHOLD)
  _randomise(model)
  with torch.no_grad():
    if fusion == 'tokenfusion':
      for predictor in model.score_predictor:
        for net in predictor.score_nets:
          net[7].weight.normal_(0.0, 20.0)
          net[7].bias.copy_(torch.tensor([0.0, 1.0]))  # leans to 'exchange': both branches do
    if fusion == 'cen':
      for name, p in model.named_parameters():
        if '.norm2.lrnorm_' in name and name.endswith('weight'):
          low = torch.rand_like(p) < 0.25
          p.copy_(torch.where(low, 0.01 * torch.rand_like(p), p))
  return model.eval()


def torch_dis(seed):
  torch.manual_seed(seed)
  model = ref.MixVisionTransformerDis(EMBED_DIMS, DEPTHS, drop_path_rate=0.0)
  _randomise(model)
  return model.eval()


def _randomise(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ('lrnorm_' in name or 'score_nets' in name):
        p.copy_(torch.rand_like(p) + 0.5 if name.endswith('weight') else 0.1 * torch.randn_like(p))


def flax_gen(fusion):
  return mt.MiTGenerator(EMBED_DIMS, depths=DEPTHS, drop_path_rate=0.0, fusion=fusion,
                         threshold=CEN_THRESHOLD if fusion == 'cen' else MASK_THRESHOLD)


def flax_dis():
  return mt.MiTDiscriminator(EMBED_DIMS, depths=DEPTHS, drop_path_rate=0.0)


@functools.lru_cache(maxsize=None)
def gen_shapes(fusion):
  x = jnp.zeros((2, BATCH, SIZE, SIZE, 3))
  return jax.eval_shape(lambda: flax_gen(fusion).init(jax.random.key(0), x, train=False,
                                                      deterministic=True))


@functools.lru_cache(maxsize=None)
def dis_shapes():
  x = jnp.zeros((2, BATCH, SIZE, SIZE, 3))
  return jax.eval_shape(lambda: flax_dis().init(jax.random.key(0), x, x, train=False))


@functools.partial(jax.jit, static_argnames='fusion')
def run_gen(variables, x, fusion):
  return flax_gen(fusion).apply(variables, x, train=False, deterministic=True)


@jax.jit
def run_dis(variables, x, y):
  return jax.nn.sigmoid(flax_dis().apply(variables, x, y, train=False))


def numpy_state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def inputs(seed, channels=3):
  return np.random.RandomState(seed).randn(2, BATCH, SIZE, SIZE, channels).astype(np.float32)


def nchw(x):
  return [torch.from_numpy(np.ascontiguousarray(x[m].transpose(0, 3, 1, 2))) for m in range(2)]


ERRORS = {}  # the largest |diff| / max |expected| seen per check (printed with -s)


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max()
  ERRORS[what] = max(ERRORS.get(what, 0.0), err / scale)
  assert err <= 1e-5 * scale, f'{what}: max |diff| {err:.3g} > {1e-5 * scale:.3g}'


def check_gen(out, torch_outs, torch_masks, fusion):
  for m in range(2):
    assert_close(out['branches'][m], torch_outs[m].permute(0, 2, 3, 1).numpy(),
                 f'{fusion} branch')
  assert_close(out['ensemble'], torch_outs[2].permute(0, 2, 3, 1).numpy(), f'{fusion} ensemble')
  assert len(out['masks']) == len(torch_masks)
  for mask, torch_mask in zip(out['masks'], torch_masks):
    flat = np.asarray(mask).reshape(2, BATCH, -1)
    for m in range(2):
      assert_close(flat[m], torch_mask[m].numpy(), f'{fusion} mask')


@pytest.mark.parametrize('fusion', ['tokenfusion', 'cen', 'none'])
def test_generator_matches_the_official_model(fusion):
  model = torch_gen(seed=0, fusion=fusion)
  state = numpy_state(model)
  variables = tokenfusion_io.import_translation_generator(
      {'module.' + k: v for k, v in state.items()}, gen_shapes(fusion))
  x = inputs(0)
  with torch.no_grad():
    torch_outs, torch_weights, torch_masks = model(nchw(x))
  out = run_gen(variables, jnp.asarray(x), fusion)
  check_gen(out, torch_outs, torch_masks, fusion)
  assert_close(out['alpha'], torch_weights.numpy(), 'alpha')
  if fusion == 'tokenfusion':
    assert len(out['masks']) == 5
    for m in range(2):
      scores = np.concatenate([np.asarray(mask[m]).ravel() for mask in out['masks']])
      exchanged = int((scores < MASK_THRESHOLD).sum())
      assert 0 < exchanged < scores.size, f'branch {m}: {exchanged} of {scores.size} exchanged'
  else:
    assert out['masks'] == []
  if fusion == 'cen':
    scales = np.concatenate([v.numpy() for k, v in model.state_dict().items()
                             if '.norm2.lrnorm_' in k and k.endswith('weight')])
    below = int((np.abs(scales) < CEN_THRESHOLD).sum())
    assert 0 < below < scales.size, f'{below} of {scales.size} norm2 scales under the threshold'
  # the exchange changes the outputs: the same weights without it give other images
  if fusion != 'none':
    plain = run_gen({'params': {k: v for k, v in variables['params'].items()
                                if not k.startswith('score_predictor_')}},
                    jnp.asarray(x), 'none')
    assert np.abs(np.asarray(plain['branches']) - np.asarray(out['branches'])).max() > 1e-3


def test_discriminator_matches_the_official_model():
  model = torch_dis(seed=1)
  variables = tokenfusion_io.import_translation_discriminator(numpy_state(model), dis_shapes())
  x, y = inputs(1), inputs(2)[0]
  with torch.no_grad():
    official = model(nchw(x), [torch.from_numpy(y.transpose(0, 3, 1, 2).copy())] * 2)
  ours = run_dis(variables, jnp.asarray(x), jnp.asarray(y))
  assert ours.shape == (2, BATCH, SIZE // 32, SIZE // 32, 1)
  for m in range(2):
    assert_close(ours[m], official[m].permute(0, 2, 3, 1).numpy(), 'discriminator')


def test_export_loads_into_the_official_models_strictly_and_round_trips():
  model = torch_gen(seed=2, fusion='tokenfusion')
  state = numpy_state(model)
  variables = tokenfusion_io.import_translation_generator(state, gen_shapes('tokenfusion'))
  exported = tokenfusion_io.export_translation_generator(variables)
  assert all(key.startswith('module.') for key in exported)
  assert set(k.removeprefix('module.') for k in exported) == set(state)
  fresh = ref.MixVisionTransformerGen(EMBED_DIMS, DEPTHS, drop_path_rate=0.0).eval()
  fresh.load_state_dict({k.removeprefix('module.'): torch.from_numpy(np.asarray(v))
                         for k, v in exported.items()}, strict=True)
  x = inputs(3)
  with torch.no_grad():
    torch_outs, _, torch_masks = fresh(nchw(x))
  check_gen(run_gen(variables, jnp.asarray(x), 'tokenfusion'), torch_outs, torch_masks,
            'exported tokenfusion')
  back = tokenfusion_io.import_translation_generator(exported, gen_shapes('tokenfusion'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)

  dis = torch_dis(seed=4)
  dis_state = numpy_state(dis)
  dis_vars = tokenfusion_io.import_translation_discriminator(dis_state, dis_shapes())
  dis_exported = tokenfusion_io.export_translation_discriminator(dis_vars)
  fresh_dis = ref.MixVisionTransformerDis(EMBED_DIMS, DEPTHS, drop_path_rate=0.0).eval()
  fresh_dis.load_state_dict({k.removeprefix('module.'): torch.from_numpy(np.asarray(v))
                             for k, v in dis_exported.items()}, strict=True)
  for key, value in fresh_dis.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), dis_state[key], err_msg=key)
  back = tokenfusion_io.import_translation_discriminator(dis_exported, dis_shapes())
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, dis_vars)


def test_parameter_counts_equal_the_reference():
  for fusion in ('tokenfusion', 'none'):
    official = ref.MixVisionTransformerGen(EMBED_DIMS, DEPTHS, fusion=fusion)
    assert count_params(gen_shapes(fusion)['params']) == ref.count_params(official), fusion
  official = ref.MixVisionTransformerDis(EMBED_DIMS, DEPTHS)
  assert count_params(dis_shapes()['params']) == ref.count_params(official)


def test_stochastic_depth_rates_are_the_official_ones(monkeypatch):
  """The rate of every block, in order (encoder, then decoder), as stochastic_depth receives
  it while tracing a training apply with the official drop_path_rate 0.1; the official decoder
  restarts its dpr index at 0 (rates up to dpr[sum(depths[:4]) - 1], never 0.1)."""
  from cen_jax.models import mit as mit_lib
  seen = []

  def record(x, rate, rng):
    seen.append(rate)
    return x

  monkeypatch.setattr(mit_lib, 'stochastic_depth', record)
  model = mt.MiTGenerator(EMBED_DIMS, depths=DEPTHS)
  x = jnp.zeros((2, 1, SIZE, SIZE, 3))
  variables = gen_shapes('tokenfusion')
  jax.eval_shape(lambda v: model.apply(v, x, train=True, deterministic=False,
                                       rngs={'dropout': jax.random.key(0)}), variables)
  official = ref.MixVisionTransformerGen(EMBED_DIMS, DEPTHS)
  rates = [b.drop_path.module.rate for b in official.modules() if isinstance(b, ref.Block)]
  expected = [r for r in rates for _ in range(2) if r > 0]  # two residual branches per block
  np.testing.assert_allclose(seen, expected, rtol=1e-6)
  assert len(rates) == 2 * sum(DEPTHS) - DEPTHS[-1] and max(rates[sum(DEPTHS):]) < 0.1


def test_zz_report_errors():
  """Prints the largest relative errors of the tests above (run with -s to see them)."""
  for what, err in sorted(ERRORS.items()):
    print(f'{what}: max |diff| / max |expected| = {err:.2e}')
