"""TokenFusion (cen_jax/models/mit.py, segformer.py; keys: cen_jax/tokenfusion_io.py) against
tests/helpers/torch_reference_mit.py, the official WeTr written from the official code.

MiT-B0 (the official architecture, widths untouched), M = 2, 64x64 inputs, random weights; the
last Linear of every score net is scaled up so that many scores fall under the official 0.02
and tokens are really exchanged. Stochastic depth and the head's Dropout2d are off (rate 0), so
training mode is deterministic too: it checks the shared head BatchNorm's per-branch batch
statistics and its two running updates, branch 0 first.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import tokenfusion_io
from cen_jax.models import count_params
from cen_jax.models import mit as mit_lib
from cen_jax.models.mit import MASK_THRESHOLD
from cen_jax.models.segformer import TokenFusionSegmenter

torch = pytest.importorskip('torch')
from tests.helpers import torch_reference_mit as ref  # noqa: E402  (needs torch)

NUM_CLASSES = 40
SIZE = 64
# The official WeTr('mit_b0', num_classes=40), M = 2, counted as the official
# utils/meter.py compute_params (parameters only): 3,643,760 encoder + 405,032 decoder + 2.
OFFICIAL_B0_PARAMS = 4_048_794
# Official mix_transformer.mit_bX() encoders (M = 2, score predictors included):
OFFICIAL_MIT_PARAMS = {'mit_b0': 3_643_760, 'mit_b1': 14_425_808, 'mit_b2': 25_482_320,
                       'mit_b3': 45_381_200, 'mit_b4': 62_172_112, 'mit_b5': 82_795_856}


def torch_model(seed=0, fusion='tokenfusion'):
  """Reference WeTr with random weights: torch init, LayerNorm/BN affine and BN statistics
  randomised (branches differ), score nets' last Linear ~ N(0, 20) (some 100-450 of the 2,720
  scores fall under 0.02)."""
  torch.manual_seed(seed)
  model = ref.WeTr('mit_b0', NUM_CLASSES, drop_path_rate=0.0, dropout=0.0, fusion=fusion)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ('.ln_' in name or '.bn.' in name or 'score_nets' in name):
        p.copy_(torch.rand_like(p) + 0.5 if name.endswith('weight') else 0.1 * torch.randn_like(p))
    if fusion == 'tokenfusion':
      for predictor in model.encoder.score_predictor:
        for net in predictor.score_nets:
          net[7].weight.normal_(0.0, 20.0)
    bn = model.decoder.linear_fuse.bn
    bn.running_mean.normal_(0.0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
  return model


def flax_model(fusion='tokenfusion'):
  return TokenFusionSegmenter(NUM_CLASSES, 'mit_b0', fusion=fusion, drop_path_rate=0.0,
                              dropout=0.0, frozen_bn=False)


@functools.lru_cache(maxsize=None)
def shapes(fusion):
  x = jnp.zeros((2, 1, SIZE, SIZE, 3))
  return jax.eval_shape(lambda: flax_model(fusion).init(jax.random.key(0), x, train=False))


def numpy_state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def inputs(seed=0, n=2):
  rng = np.random.RandomState(seed)
  return rng.randn(2, n, SIZE, SIZE, 3).astype(np.float32)


def torch_inputs(x):
  return [torch.from_numpy(np.ascontiguousarray(x[m].transpose(0, 3, 1, 2))) for m in range(2)]


@functools.partial(jax.jit, static_argnames=('fusion', 'train'))
def run(variables, x, fusion, train):
  model = flax_model(fusion)
  if train:
    return model.apply(variables, x, train=True, mutable=['batch_stats'])
  return model.apply(variables, x, train=False), None


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, what
  bound = 1e-5 * max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max()
  assert err <= bound, f'{what}: max |diff| {err:.3g} > {bound:.3g}'


def check_outputs(out, torch_outs, torch_masks):
  for m in range(2):
    assert_close(out['branches'][m], torch_outs[m].permute(0, 2, 3, 1).numpy(), f'branch {m}')
  assert_close(out['ensemble'], torch_outs[2].permute(0, 2, 3, 1).numpy(), 'ensemble')
  assert len(out['masks']) == len(torch_masks)
  for k, (mask, torch_mask) in enumerate(zip(out['masks'], torch_masks)):
    flat = np.asarray(mask).reshape(2, mask.shape[1], -1)
    for m in range(2):
      assert_close(flat[m], torch_mask[m].numpy(), f'mask of block {k}, branch {m}')


@pytest.mark.parametrize('fusion', ['tokenfusion', 'none'])
def test_eval_forward_matches_the_official_model(fusion):
  model = torch_model(fusion=fusion).eval()
  variables = tokenfusion_io.import_tokenfusion(numpy_state(model), shapes(fusion))
  x = inputs()
  with torch.no_grad():
    torch_outs, torch_masks = model(torch_inputs(x))
  out, _ = run(variables, jnp.asarray(x), fusion, False)
  check_outputs(out, torch_outs, torch_masks)
  if fusion == 'tokenfusion':
    scores = np.concatenate([np.asarray(m).ravel() for m in out['masks']])
    exchanged = int((scores < MASK_THRESHOLD).sum())
    assert 0 < exchanged < scores.size, f'{exchanged} of {scores.size} tokens exchanged'
  else:
    assert out['masks'] == []


def test_train_forward_and_shared_bn_updates_match_the_official_model():
  model = torch_model(seed=1).train()
  variables = tokenfusion_io.import_tokenfusion(numpy_state(model), shapes('tokenfusion'))
  x = inputs(seed=1)
  with torch.no_grad():
    torch_outs, torch_masks = model(torch_inputs(x))
  out, updated = run(variables, jnp.asarray(x), 'tokenfusion', True)
  check_outputs(out, torch_outs, torch_masks)
  stats = updated['batch_stats']['decoder']['linear_fuse']['bn']
  bn = model.decoder.linear_fuse.bn
  assert_close(stats['mean'], bn.running_mean.numpy(), 'running mean')
  assert_close(stats['var'], bn.running_var.numpy(), 'running var')


def test_export_loads_into_the_official_model_strictly_and_round_trips():
  model = torch_model(seed=2)
  state = numpy_state(model)
  variables = tokenfusion_io.import_tokenfusion(state, shapes('tokenfusion'))
  exported = tokenfusion_io.export_tokenfusion(variables)
  assert all(key.startswith('module.') for key in exported)
  fresh = ref.WeTr('mit_b0', NUM_CLASSES)
  fresh.load_state_dict({k.removeprefix('module.'): torch.from_numpy(np.asarray(v))
                         for k, v in exported.items()}, strict=True)
  for key, value in fresh.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
  assert set(k.removeprefix('module.') for k in exported) == set(state)


def test_parameter_count_is_the_official_one():
  official = ref.WeTr('mit_b0', NUM_CLASSES)
  assert ref.count_params(official) == OFFICIAL_B0_PARAMS
  assert count_params(shapes('tokenfusion')['params']) == OFFICIAL_B0_PARAMS
  assert ref.count_params(official.encoder) == OFFICIAL_MIT_PARAMS['mit_b0']


def test_gradients_match_the_official_model():
  """Gradients of every parameter for a loss over both branches, the ensemble and the score
  L1 (lamda 1e-2, so the score nets' own term counts): the exchange routes a swapped token's
  gradient to the branch it came from, and the ensemble trains only alpha."""
  model = torch_model(seed=3).eval()
  state = numpy_state(model)
  variables = tokenfusion_io.import_tokenfusion(state, shapes('tokenfusion'))
  x = inputs(seed=3, n=1)
  rng = np.random.RandomState(3)
  weights = rng.randn(3, 1, SIZE // 4, SIZE // 4, NUM_CLASSES).astype(np.float32)
  lamda = 1e-2

  outs, masks = model(torch_inputs(x))
  loss = sum((o.permute(0, 2, 3, 1) * torch.from_numpy(w)).sum() for o, w in zip(outs, weights))
  loss = loss + lamda * sum(m.abs().sum() for mask in masks for m in mask)
  loss.backward()

  def flax_loss(params):
    out = flax_model().apply({**variables, 'params': params}, jnp.asarray(x), train=False)
    logits = jnp.concatenate([out['branches'], out['ensemble'][None]])
    return jnp.sum(logits * weights) + lamda * mit_lib.mask_l1(out['masks'])

  grads = jax.jit(jax.grad(flax_loss))(variables['params'])
  exported = tokenfusion_io.export_tokenfusion(
      {'params': grads, 'batch_stats': variables['batch_stats']}, prefix='')
  # Relative to each leaf, plus a floor of 1e-6 of the largest gradient: the gradient of a
  # score head's 2-entry bias is a sum over all tokens of terms that cancel (its two entries
  # sum to zero), so where it is tiny its relative error says nothing.
  floor = 1e-6 * max(float(p.grad.abs().max()) for p in model.parameters())
  for name, p in model.named_parameters():
    expected = p.grad.numpy()
    error = np.abs(np.asarray(exported[name]) - expected).max()
    assert error <= 1e-4 * np.abs(expected).max() + floor, f'{name}: max |diff| {error:.3g}'


def test_official_checkpoint_imported_then_predicted_reproduces_the_official_model(tmp_path):
  """An official-format training checkpoint ({'segmenter': state_dict} with DataParallel names,
  written by torch.save) goes through what `main.py --mode import` and `--mode predict
  --save_logits` call; the saved logits equal the official model's on the same image files."""
  from PIL import Image
  from cen_jax import train
  from cen_jax.configs import nyudv2_tokenfusion_mit
  model = torch_model(seed=3).eval()
  path = str(tmp_path / 'checkpoint.pth.tar')
  torch.save({'segmenter': {'module.' + k: v for k, v in model.state_dict().items()},
              'epoch_start': 7, 'best_val': 0.5}, path)
  config = nyudv2_tokenfusion_mit.get_config('b0')
  config.model.drop_path_rate = 0.0
  config.model.dropout = 0.0
  config.data.crop_size = SIZE
  workdir = str(tmp_path / 'run')
  assert train.import_torch_checkpoint(config, path, workdir) == 0

  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  depth = rng.integers(0, 60000, (SIZE, SIZE), dtype=np.uint16)
  files = [str(tmp_path / 'scene_rgb.png'), str(tmp_path / 'scene_depth.png')]
  Image.fromarray(rgb).save(files[0])
  Image.fromarray(depth).save(files[1])
  flax_net = train.build(config)
  variables, step = train.restore_variables(config, workdir, flax_net)
  assert step == 0
  out_dir = str(tmp_path / 'out')
  train._task(config).predict(config, flax_net, variables, files, out_dir, save_logits=True)

  d = config.data  # normalised as the dataset is, written out here
  x_rgb = (rgb / 255.0 - np.asarray(d.rgb_mean)) / np.asarray(d.rgb_std)
  x_depth = np.repeat(depth[:, :, None].astype(np.float64) * d.depth_scale, 3, axis=2)
  x = np.stack([x_rgb, x_depth]).astype(np.float32)[:, None]
  with torch.no_grad():
    torch_outs, torch_masks = model(torch_inputs(x))
  scores = np.concatenate([m.numpy().ravel() for mask in torch_masks for m in mask])
  assert 0 < int((scores < MASK_THRESHOLD).sum()) < scores.size  # tokens really exchanged
  for name, official in zip(('rgb', 'depth', 'ensemble'), torch_outs):
    saved = np.load(os.path.join(out_dir, f'scene_rgb_{name}.npy'))
    assert_close(saved, official[0].permute(1, 2, 0).numpy(), f'saved {name} logits')
