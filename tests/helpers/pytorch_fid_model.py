"""pytorch-fid's own FID InceptionV3 (the `pytorch-fid` package) with given weights, for parity.

pytorch-fid builds its network from `torchvision.models.inception_v3`. The registry's torchvision
wheels are built against the CUDA torch and fail to import beside the CPU torch wheel
(`RuntimeError: operator torchvision::nms does not exist`, raised while registering the C
extension's detection ops at `import torchvision`). When that happens this module imports
torchvision's pure-Python model code without running torchvision/__init__.py (the C ops are not
used by Inception3), then pytorch-fid unchanged. Its `fid_inception_v3` fetches the weights with
`load_state_dict_from_url`; that is replaced by reading the given state_dict (nothing downloads).
"""

import importlib.util
import sys
import types


def _import_torchvision():
  try:
    import torchvision  # noqa: F401
    return
  except RuntimeError:
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
      del sys.modules[name]
  spec = importlib.util.find_spec('torchvision')
  package = types.ModuleType('torchvision')
  package.__path__ = list(spec.submodule_search_locations)
  package.__spec__ = spec
  sys.modules['torchvision'] = package
  import torchvision.models  # noqa: F401  (pure Python)
  import torchvision.version
  package.__version__ = torchvision.version.__version__
  package.models = sys.modules['torchvision.models']


def pytorch_fid_inception(state_dict):
  """pytorch_fid.inception.InceptionV3([3]) (2048-d pool3, resize + normalise on) in eval mode,
  holding `state_dict` (loaded strictly by pytorch-fid's own fid_inception_v3)."""
  _import_torchvision()
  from pytorch_fid import inception
  original = inception.load_state_dict_from_url
  inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
  try:
    return inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    inception.load_state_dict_from_url = original
