"""The Flax FID InceptionV3 against pytorch-fid's own model, and the weight-file import.

Needs torch, torchvision and pytorch-fid (requirements-torch.txt): CI runs this file in the
Python 3.11 torch venv; elsewhere it is skipped. Random weights (the real file cannot be
downloaded here) are written in pytorch-fid's state_dict format and go through the import path.
"""

import os

import jax
import numpy as np
import pytest

from cen_jax import fid

torch = pytest.importorskip('torch')
pytest.importorskip('pytorch_fid')
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """A random pytorch-fid weight file (.pth) and the variables it was made from."""
  variables = fid.random_variables(seed=3)
  path = str(tmp_path_factory.mktemp('fid') / 'pt_inception-2015-12-05-random.pth')
  torch.save({k: torch.from_numpy(v) for k, v in fid.export_state_dict(variables).items()}, path)
  return path, variables


def _torch_features(model, images):
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return model(x)[0].reshape(len(images), -1).numpy()


@pytest.mark.parametrize('size', [(299, 299), (72, 90), (331, 310)])
def test_features_equal_pytorch_fid(weights, size):
  """pool3 features of pytorch-fid's InceptionV3 within 1e-4 of max|feature| (299: no resize;
  72x90: bilinear upsampling; 331x310: downsampling, non-square)."""
  from tests.helpers.pytorch_fid_model import pytorch_fid_inception
  path, _ = weights
  model = pytorch_fid_inception(torch.load(path))
  images = np.random.default_rng(sum(size)).uniform(0, 1, (2,) + size + (3,)).astype(np.float32)
  expected = _torch_features(model, images)
  got = np.asarray(jax.jit(fid.features)(fid.load_weights(path), images))
  ratio = np.abs(got - expected).max() / np.abs(expected).max()
  print(f'{size}: max|diff| / max|feature| = {ratio:.2e} (max|feature| {np.abs(expected).max():.3f})')
  assert expected.shape == (2, 2048) and np.abs(expected).max() > 0.1
  assert ratio < 1e-4


def test_pth_is_converted_once_to_npz(weights, monkeypatch):
  path, variables = weights
  npz = fid.npz_path_for(path)
  first = fid.load_weights(path)
  assert os.path.isfile(npz)
  from cen_jax import torch_io
  monkeypatch.setattr(torch_io, '_import_torch', lambda p: pytest.fail(f'torch used for {p}'))
  for loaded in (fid.load_weights(path), fid.load_weights(npz)):  # both read the .npz
    for a, b, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(first), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)


def test_wrong_network_is_a_one_line_error(weights, tmp_path):
  path, _ = weights
  state_dict = torch.load(path)
  state_dict['fc.weight'] = torch.zeros(1000, 2048)  # torchvision's ImageNet InceptionV3 head
  imagenet = str(tmp_path / 'inception_v3_google.pth')
  torch.save(state_dict, imagenet)
  with pytest.raises(ValueError, match='not the pytorch-fid FID InceptionV3') as error:
    fid.load_weights(imagenet)
  assert imagenet in str(error.value) and '\n' not in str(error.value)
  del state_dict['Mixed_6b.branch7x7_2.conv.weight']
  state_dict['fc.weight'] = torch.zeros(1008, 2048)
  torch.save(state_dict, imagenet)
  with pytest.raises(ValueError, match="no 'Mixed_6b.branch7x7_2.conv.weight'"):
    fid.load_weights(imagenet)
