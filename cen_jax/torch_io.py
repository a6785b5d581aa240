"""PyTorch checkpoints <-> Flax variables. numpy in and out; torch is imported lazily, only to
read or write a .pth file, so training and evaluation never need it.

Name map (official CEN / AsymFusion RefineNet-LW, `yikaiw/CEN` models/model.py):
  encoder/conv1/kernel                  conv1.module.weight          (kH,kW,I,O) <-> (O,I,kH,kW)
  encoder/bn1/scale, bias [M, C]        bn1.bn_{m}.weight, .bias     one key per branch m < M
  batch_stats .../mean, var [M, C]      bn_{m}.running_mean, .running_var
  encoder/layer{s}_{i}/conv{k}, bn{k}   layer{s}.{i}.conv{k}.module, layer{s}.{i}.bn{k}
  .../downsample_conv, downsample_bn    layer{s}.{i}.downsample.0.module, .downsample.1
  adapt_stage{n}_b, mflow_conv_g{n}_pool, mflow_conv_g{n}_b
                                        the same name + '.0' (official nn.Sequential wrappers)
  other decoder convs ('1_conv' ...)    name.module.weight / .bias
  alpha [M]                             alpha
Official checkpoints are saved from `nn.DataParallel`, so every key also starts with 'module.';
both forms are read. `num_batches_tracked` is ignored on import and written as 0 on export.
torchvision ResNets use the encoder names without '.module' and without '.bn_{m}': each
ImageNet BN initialises every branch's private BN (the official `expand_model_dict`).

The translation networks (official image2image_translation G and D) have their own map, at
the end of this file (`import_generator`, `export_generator`, `import_discriminator`, ...).

Every error is a `CheckpointError` (a ValueError) with a one-line message.
"""

import os
import pickle
import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from cen_jax.io_utils import atomic_write

DP_PREFIX = 'module.'  # nn.DataParallel
SEQUENTIAL = re.compile(r'adapt_stage\d+_b|mflow_conv_g\d+_pool|mflow_conv_g\d+_b')
BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
TORCHVISION_HEAD = re.compile(r'fc\.(weight|bias)')


def _decoder_order() -> tuple:
  names = ['p_ims1d2_outl1_dimred', 'adapt_stage1_b', 'mflow_conv_g1_pool', 'mflow_conv_g1_b',
           'mflow_conv_g1_b3_joint_varout_dimred']
  for n in (2, 3, 4):
    names += [f'p_ims1d2_outl{n}_dimred', f'adapt_stage{n}_b',
              f'adapt_stage{n}_b2_joint_varout_dimred', f'mflow_conv_g{n}_pool',
              f'mflow_conv_g{n}_b']
    if n < 4:
      names.append(f'mflow_conv_g{n}_b3_joint_varout_dimred')
  return tuple(names + ['clf_conv'])


DECODER_ORDER = _decoder_order()
# torch state_dict order: a module's own parameters first (alpha), then its children in
# registration order (official RefineNet.__init__), then within modules as below.
NAME_ORDER = {name: i for i, name in enumerate((
    'alpha', 'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample',
    'layer1', 'layer2', 'layer3', 'layer4', *DECODER_ORDER,
    'module', 'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'))}
RCU_SUFFIX_ORDER = {'conv': 0, 'conv_relu_varout_dimred': 1, 'outvar_dimred': 0}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model (one-line message)."""


# ----------------------------------------------------------------------------- files

def load_state_dict(path) -> dict:
  """{key: np.ndarray} from a .pth/.pt/.pth.tar (torch) or .npz file.

  An official training checkpoint {'segmenter': state_dict, 'epoch_start': ..., 'best_val': ...}
  is unwrapped to its state_dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file {path!r} does not exist')
  obj = _read_npz(path) if path.endswith('.npz') else _read_torch(path)
  return _unwrap(obj, path)


def read_into(path: str, read, variables) -> dict:
  """read(state_dict of the file at `path`, variables), its errors naming the file."""
  try:
    return read(load_state_dict(path), variables)
  except CheckpointError as e:
    message = str(e)
    raise CheckpointError(message if message.startswith(path) else f'{path}: {message}') from None


def convert_pth_to_npz(src, dst) -> None:
  """Converts a PyTorch checkpoint to .npz once, so training can start from it without torch."""
  state_dict = load_state_dict(src)
  with atomic_write(dst, 'wb') as f:
    np.savez(f, **state_dict)


def save_torch_checkpoint(path, variables) -> None:
  """Writes {'segmenter': state_dict} in the official layout (needs torch)."""
  _save_torch_segmenter(path, export_cen_state_dict(variables))


def save_segmenter(path, state_dict) -> None:
  """{'segmenter': state_dict} in the official layout (needs torch), or, for a path ending in
  .npz, the state_dict as an .npz file (numpy only; `load_state_dict` reads both)."""
  if os.fspath(path).endswith('.npz'):
    with atomic_write(path, 'wb') as f:
      np.savez(f, **{k: np.asarray(v) for k, v in state_dict.items()})
    return
  _save_torch_segmenter(path, state_dict)


def _save_torch_segmenter(path, state_dict) -> None:
  torch = _import_torch(path)
  from collections import OrderedDict
  tensors = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())
  with atomic_write(path, 'wb') as f:
    torch.save({'segmenter': tensors}, f)


def _import_torch(path):
  try:
    import torch
  except ImportError:
    raise CheckpointError(f'{path}: reading or writing a PyTorch file needs torch (pip install '
                          f'-r requirements-torch.txt); convert it to .npz with '
                          f'torch_io.convert_pth_to_npz where torch is installed') from None
  return torch


def _read_npz(path) -> dict:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - np.load raises many types for a non-npz file
    raise CheckpointError(f'{path}: not a checkpoint (not a readable .npz: {_first_line(e)})') \
        from None


def _numpy_scalar_globals() -> list:
  """Pickle globals of numpy scalars (official checkpoints store `best_val` as np.float64)."""
  try:
    from numpy._core.multiarray import scalar
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar
  dtypes = [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                        'bool')]
  return [scalar, np.dtype] + dtypes


def _read_torch(path):
  torch = _import_torch(path)
  try:
    try:
      return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
      # weights_only refuses numpy scalars; allow exactly those, never arbitrary pickles.
      with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch.load raises many types for a non-checkpoint
    raise CheckpointError(f'{path}: not a PyTorch checkpoint ({type(e).__name__}: '
                          f'{_first_line(e)})') from None


def _first_line(error) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0][:200] if lines else type(error).__name__


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, without importing torch
    value = value.detach().cpu()
    try:
      return value.numpy()
    except TypeError:  # bfloat16 has no numpy dtype
      return value.float().numpy()
  return np.asarray(value)


def _unwrap(obj, path) -> dict:
  if isinstance(obj, Mapping):
    for wrapper in ('segmenter', 'state_dict'):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(f'{path}: not a checkpoint (holds a {type(obj).__name__}, '
                          f'not a state_dict of arrays)')
  out = {}
  for key, value in obj.items():
    if not hasattr(value, 'shape'):
      raise CheckpointError(f'{path}: not a state_dict (entry {key!r} is a '
                            f'{type(value).__name__}, not an array)')
    out[str(key)] = _to_numpy(value)
  return out


# ----------------------------------------------------------------------------- name map

class Slot(NamedTuple):
  """One Flax leaf and the torch keys that hold it."""
  collection: str  # 'params' | 'batch_stats'
  path: tuple  # inside the collection
  kind: str  # 'conv', 'deconv' (kernels transposed), 'bn' (one key per branch), 'bn_shared',
  # 'plain'
  keys: tuple  # torch keys without the DataParallel prefix
  shape: tuple  # the Flax leaf's shape


def flatten_tree(tree, prefix=()) -> list:
  """[(path, leaf)] of a nested dict."""
  out = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out += flatten_tree(value, prefix + (key,))
    else:
      out.append((prefix + (key,), value))
  return out


def set_in_tree(tree: dict, path: tuple, value) -> None:
  """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_module_name(path: tuple) -> str:
  """Flax module path -> official torch module name (no DataParallel prefix)."""
  parts = []
  for name in path:
    layer = re.fullmatch(r'layer(\d+)_(\d+)', name)
    if name == 'encoder':
      continue
    elif layer:
      parts += [f'layer{layer[1]}', layer[2]]
    elif name in ('downsample_conv', 'downsample_bn'):
      parts += ['downsample', '0' if name == 'downsample_conv' else '1']
    else:
      parts.append(name)
      if SEQUENTIAL.fullmatch(name):
        parts.append('0')
  return '.'.join(parts)


def _slot(collection, path, shape, siblings, style) -> Slot:
  """The torch key(s) of one Flax leaf. style: 'cen' (official segmenter) or 'torchvision'."""
  *module, leaf = path
  name = torch_module_name(tuple(module))
  is_bn = collection == 'batch_stats' or 'scale' in siblings
  if collection == 'params' and path == ('alpha',):
    return Slot(collection, path, 'plain', ('alpha',), shape)
  if collection == 'params' and leaf in ('kernel', 'bias') and not is_bn:
    conv = name if style == 'torchvision' else f'{name}.module'
    return Slot(collection, path, 'conv' if leaf == 'kernel' else 'plain',
                (f'{conv}.{"weight" if leaf == "kernel" else "bias"}',), shape)
  if is_bn and leaf in BN_NAMES and len(shape) == 2:
    if style == 'torchvision':
      return Slot(collection, path, 'bn_shared', (f'{name}.{BN_NAMES[leaf]}',), shape)
    keys = tuple(f'{name}.bn_{m}.{BN_NAMES[leaf]}' for m in range(shape[0]))
    return Slot(collection, path, 'bn', keys, shape)
  raise CheckpointError(f'no PyTorch name for model variable {collection}/{"/".join(path)}')


def slots(variables, style: str = 'cen') -> list:
  """Every leaf of `variables` ({'params', 'batch_stats'}) with its torch key(s).

  style 'torchvision' covers the encoder only (the decoder has no ImageNet weights).
  """
  out = []
  for collection in ('params', 'batch_stats'):
    if collection not in variables:
      raise CheckpointError(f'variables have no {collection!r} collection')
    leaves = flatten_tree(variables[collection])
    siblings = {}
    for path, _ in leaves:
      siblings.setdefault(path[:-1], set()).add(path[-1])
    for path, leaf in leaves:
      if style == 'torchvision' and path[0] != 'encoder':
        continue
      if style in PIX2PIX_STYLES:
        out.append(_pix2pix_slot(collection, path, tuple(leaf.shape), style))
      else:
        out.append(_slot(collection, path, tuple(leaf.shape), siblings[path[:-1]], style))
  return out


def torch_shape(slot: Slot) -> tuple:
  """The shape each of the slot's torch keys has."""
  if slot.kind == 'conv':
    kh, kw, cin, cout = slot.shape
    return (cout, cin, kh, kw)
  if slot.kind == 'deconv':
    kh, kw, cin, cout = slot.shape
    return (cin, cout, kh, kw)
  if slot.kind in ('bn', 'bn_shared'):
    return slot.shape[1:]
  return slot.shape


def _component_rank(name: str) -> tuple:
  if name in NAME_ORDER:
    return (0, NAME_ORDER[name], '')
  index = re.fullmatch(r'(?:bn_)?(\d+)', name)
  if index:
    return (1, int(index[1]), '')
  unit = re.fullmatch(r'(\d+)_(.+)', name)
  if unit and unit[2] in RCU_SUFFIX_ORDER:
    return (2, 2 * int(unit[1]) + RCU_SUFFIX_ORDER[unit[2]], '')
  return (3, 0, name)


def torch_order(key: str) -> tuple:
  """Sort key that puts state_dict keys in the order torch's `state_dict()` lists them."""
  return tuple(_component_rank(part) for part in key.split('.'))


def expected_shapes(variables, style: str = 'cen') -> dict:
  """{torch key (no prefix): shape} the model needs, in torch order."""
  shapes = {key: torch_shape(s) for s in slots(variables, style) for key in s.keys}
  order = pix2pix_order if style in PIX2PIX_STYLES else torch_order
  return dict(sorted(shapes.items(), key=lambda kv: order(kv[0])))


# ----------------------------------------------------------------------------- checks

def strip_dp_prefix(state_dict) -> dict:
  """{key without the DataParallel prefix: original key}."""
  out = {}
  for key in state_dict:
    bare = key.removeprefix(DP_PREFIX)
    if bare in out:
      raise CheckpointError(f'checkpoint holds both {out[bare]!r} and {key!r}')
    out[bare] = key
  return out


def _num_branches(variables):
  alpha = variables['params'].get('alpha')  # the discriminator has none
  return None if alpha is None else int(alpha.shape[0])


def _hint(bare: str, style: str, num_branches) -> str:
  if style in PIX2PIX_STYLES:
    return _pix2pix_hint(bare, style, num_branches)
  branch = re.search(r'\.bn_(\d+)\.', bare)
  if style == 'torchvision' and (branch or '.module.' in bare or bare == 'alpha'):
    return ' (an official CEN/AsymFusion segmentation checkpoint? import it with --mode=import)'
  if style == 'cen' and (TORCHVISION_HEAD.fullmatch(bare) or re.fullmatch(
      r'(layer\d+\.\d+\.)?(conv\d|bn\d)\.\w+', bare)):
    return ' (a torchvision ImageNet ResNet? use it as config.model.init_from)'
  if branch:
    return f' (the model has {num_branches} modalities)'
  if bare == 'alpha':
    return f' (alpha has one entry per modality; the model has {num_branches})'
  if re.match(r'layer\d+\.\d+\.', bare):
    return ' (a ResNet of another depth?)'
  if bare.startswith('clf_conv.'):
    return ' (another number of classes?)'
  return ''


def check_state_dict(state_dict, variables, style: str = 'cen') -> dict:
  """Raises CheckpointError naming the first key that does not fit; returns {bare: key}.

  Checkpoint keys are checked in the checkpoint's order (unexpected key or wrong shape), then
  the model's keys in torch order (missing key). num_batches_tracked is ignored, and so is the
  ImageNet classifier (fc.*) for style 'torchvision'.
  """
  expected = expected_shapes(variables, style)
  names = strip_dp_prefix(state_dict)
  num_branches = _num_branches(variables)
  for bare, key in names.items():
    if bare.endswith('num_batches_tracked'):
      continue
    if style == 'torchvision' and TORCHVISION_HEAD.fullmatch(bare):
      continue
    if bare not in expected:
      raise CheckpointError(f'checkpoint key {key!r} is not in the model'
                            f'{_hint(bare, style, num_branches)}')
    shape = tuple(state_dict[key].shape)
    if shape != expected[bare]:
      raise CheckpointError(f'checkpoint key {key!r} has shape {shape} but the model expects '
                            f'{expected[bare]}{_hint(bare, style, num_branches)}')
  prefixed = any(key.startswith(DP_PREFIX) for key in state_dict)
  for bare, shape in expected.items():
    if bare not in names:
      shown = DP_PREFIX + bare if prefixed else bare
      raise CheckpointError(f'checkpoint lacks key {shown!r} (shape {shape}) that the model '
                            f'expects{_hint(bare, style, num_branches)}')
  return names


# ----------------------------------------------------------------------------- conversion

def from_torch(slot: Slot, arrays: list) -> np.ndarray:
  if slot.kind == 'conv':
    return arrays[0].transpose(2, 3, 1, 0)
  if slot.kind == 'deconv':  # [C_in, C_out, kH, kW] -> [kH, kW, C_in, C_out]
    return arrays[0].transpose(2, 3, 0, 1)
  if slot.kind == 'bn':
    return np.stack(arrays)
  if slot.kind == 'bn_shared':
    return np.broadcast_to(arrays[0], slot.shape)
  return arrays[0]


def to_torch(slot: Slot, leaf) -> list:
  leaf = np.asarray(leaf)
  if slot.kind == 'conv':
    return [leaf.transpose(3, 2, 0, 1)]
  if slot.kind == 'deconv':
    return [leaf.transpose(2, 3, 0, 1)]
  if slot.kind == 'bn':
    return list(leaf)
  return [leaf]


def _template_dtype(leaf):
  return np.dtype(getattr(leaf, 'dtype', np.float32))


def _import(state_dict, variables, style: str) -> dict:
  names = check_state_dict(state_dict, variables, style)
  out = {name: _copy_tree(tree) for name, tree in variables.items()}
  templates = {(c,) + path: leaf for c in ('params', 'batch_stats')
               for path, leaf in flatten_tree(variables[c])}
  for s in slots(variables, style):
    arrays = [_to_numpy(state_dict[names[key]]) for key in s.keys]
    template = templates[(s.collection,) + s.path]
    leaf = np.ascontiguousarray(from_torch(s, arrays), dtype=_template_dtype(template))
    set_in_tree(out[s.collection], s.path, leaf)
  return out


def _copy_tree(tree):
  if isinstance(tree, Mapping):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return tree


def import_torchvision_resnet(state_dict, variables) -> dict:
  """torchvision ResNet-50/101/152 ImageNet weights into the encoder of `variables`.

  Every branch's private BN starts from the same ImageNet BN (official `expand_model_dict`);
  fc.* is ignored; the decoder is left as given. Returns new variables (numpy leaves where
  replaced).
  """
  return _import(state_dict, variables, 'torchvision')


def import_cen_checkpoint(state_dict, variables) -> dict:
  """An official CEN/AsymFusion segmentation state_dict (with or without the 'module.' prefix)
  into the whole model. Every model leaf must be found and every checkpoint key used (except
  num_batches_tracked). `variables` may hold arrays or jax.ShapeDtypeStruct (shapes only)."""
  return _import(state_dict, variables, 'cen')


def export_cen_state_dict(variables) -> dict:
  """Official state_dict {'module.<key>': np.ndarray} in torch order (DataParallel names, as
  the official checkpoints), num_batches_tracked included as int64 zeros."""
  flat = {}
  for collection in ('params', 'batch_stats'):
    flat.update({(collection,) + path: leaf for path, leaf in flatten_tree(variables[collection])})
  out = {}
  for s in slots(variables, 'cen'):
    for key, array in zip(s.keys, to_torch(s, flat[(s.collection,) + s.path])):
      out[key] = array
      if s.kind == 'bn' and key.endswith('.running_var'):
        out[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return {DP_PREFIX + k: out[k] for k in sorted(out, key=torch_order)}


# ----------------------------------------------------------------------------- translation
# Official CEN image2image_translation checkpoints (`torch.save(G.state_dict())`,
# checkpoint-gen.pkl; `D.state_dict()`, checkpoint-dis.pkl), no DataParallel prefix:
#   conv{k}/conv/kernel, bias              conv{k}.conv.module.weight, .bias   (O,I,kH,kW)
#   conv{k}/insnorm_conv/scale, bias [M,C] conv{k}.insnorm_conv.insnorm_{m}.weight, .bias
#   batch_stats .../mean, var [M, C]       ...insnorm_{m}.running_mean, .running_var
#   deconv{k}/deconv/kernel, bias          deconv{k}.deconv.module.weight, .bias (I,O,kH,kW)
#   deconv{k}/insnorm_deconv/...           deconv{k}.insnorm_deconv.insnorm_{m}.*
#   alpha [M]                              alpha
#   D: conv{k}/conv/..., conv{k}/insnorm/scale, bias, batch_stats mean, var [C]
#                                          conv{k}.conv.module.*, conv{k}.insnorm.module.*
# num_batches_tracked is ignored on import and written as 0 on export (momentum is set, so
# torch never reads it).

PIX2PIX_STYLES = ('pix2pix_g', 'pix2pix_d')
PRIVATE_IN = ('insnorm_conv', 'insnorm_deconv')
_LEAF_ORDER = {'weight': 0, 'bias': 1, 'running_mean': 2, 'running_var': 3,
               'num_batches_tracked': 4}


def _pix2pix_slot(collection, path, shape, style) -> Slot:
  where = f'{collection}/{"/".join(path)}'
  if collection == 'params' and path == ('alpha',) and style == 'pix2pix_g':
    return Slot(collection, path, 'plain', ('alpha',), shape)
  if len(path) == 3:
    block, layer, leaf = path
    if collection == 'params' and layer in ('conv', 'deconv') and leaf in ('kernel', 'bias'):
      kind = (layer if leaf == 'kernel' else 'plain')
      torch_leaf = 'weight' if leaf == 'kernel' else 'bias'
      return Slot(collection, path, kind, (f'{block}.{layer}.module.{torch_leaf}',), shape)
    if layer in PRIVATE_IN and leaf in BN_NAMES and len(shape) == 2:
      keys = tuple(f'{block}.{layer}.insnorm_{m}.{BN_NAMES[leaf]}' for m in range(shape[0]))
      return Slot(collection, path, 'bn', keys, shape)
    if layer == 'insnorm' and leaf in BN_NAMES and len(shape) == 1:
      return Slot(collection, path, 'plain', (f'{block}.insnorm.module.{BN_NAMES[leaf]}',),
                  shape)
  raise CheckpointError(f'no PyTorch name for model variable {where}')


def _pix2pix_rank(part: str) -> tuple:
  block = re.fullmatch(r'(de)?conv(\d+)', part)
  if block:
    return (2 if block[1] else 1, int(block[2]))
  branch = re.fullmatch(r'insnorm_(\d+)', part)
  if branch:
    return (0, int(branch[1]))
  if part in _LEAF_ORDER:
    return (0, _LEAF_ORDER[part])
  if part in ('insnorm',) + PRIVATE_IN:
    return (1, 0)
  return (0, 0)  # 'alpha' (a module's own parameter comes first), 'conv', 'deconv', 'module'


def pix2pix_order(key: str) -> tuple:
  """Sort key that puts translation state_dict keys in torch's `state_dict()` order."""
  return tuple(_pix2pix_rank(part) for part in key.split('.'))


def _pix2pix_hint(bare: str, style: str, num_branches) -> str:
  if re.search(r'\.insnorm_\d+\.', bare) or bare == 'alpha':
    return f' (the model has {num_branches} modalities)'
  if re.fullmatch(r'(de)?conv\d+\.\w+\.\w+\.\w+', bare):
    return ' (another ngf/ndf, or num_downs (log2 of config.data.crop_size)?)'
  return ''


def _check_network(state_dict, style) -> None:
  """A generator checkpoint has 'alpha' and private norms; a discriminator has neither."""
  bare = [key.removeprefix(DP_PREFIX) for key in state_dict]
  is_generator = 'alpha' in bare or any('.insnorm_conv.' in key for key in bare)
  if style == 'pix2pix_g' and not is_generator and any('.insnorm.module.' in k for k in bare):
    raise CheckpointError('checkpoint is a discriminator state_dict (conv*.insnorm.module keys, '
                          'no alpha): checkpoint-dis.pkl goes to import_discriminator')
  if style == 'pix2pix_d' and is_generator:
    raise CheckpointError('checkpoint is a generator state_dict (it has alpha / insnorm_conv '
                          'keys): checkpoint-gen.pkl goes to import_generator')


def import_generator(state_dict, variables) -> dict:
  """An official translation generator state_dict (checkpoint-gen.pkl) into `variables`
  ({'params', 'batch_stats'}, arrays or jax.ShapeDtypeStruct). Every leaf must be found and
  every key used (num_batches_tracked excepted); returns new variables with numpy leaves."""
  _check_network(state_dict, 'pix2pix_g')
  return _import(state_dict, variables, 'pix2pix_g')


def import_discriminator(state_dict, variables) -> dict:
  """An official translation discriminator state_dict (checkpoint-dis.pkl) into `variables`."""
  _check_network(state_dict, 'pix2pix_d')
  return _import(state_dict, variables, 'pix2pix_d')


def _export(variables, style) -> 'OrderedDict':
  from collections import OrderedDict
  flat = {}
  for collection in ('params', 'batch_stats'):
    flat.update({(collection,) + path: leaf for path, leaf in flatten_tree(variables[collection])})
  out = {}
  for s in slots(variables, style):
    for key, array in zip(s.keys, to_torch(s, flat[(s.collection,) + s.path])):
      out[key] = array
      if key.endswith('.running_var'):
        out[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return OrderedDict((k, out[k]) for k in sorted(out, key=pix2pix_order))


def export_generator(variables) -> 'OrderedDict':
  """The official `G.state_dict()` {key: np.ndarray}, in torch order, no 'module.' prefix."""
  return _export(variables, 'pix2pix_g')


def export_discriminator(variables) -> 'OrderedDict':
  """The official `D.state_dict()` {key: np.ndarray}, in torch order."""
  return _export(variables, 'pix2pix_d')


def save_state_dict(path, state_dict) -> None:
  """torch.save of a plain state_dict of numpy arrays (the official .pkl files; needs torch)."""
  torch = _import_torch(path)
  from collections import OrderedDict
  tensors = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())
  with atomic_write(path, 'wb') as f:
    torch.save(tensors, f)


def save_generator(path, variables) -> None:
  save_state_dict(path, export_generator(variables))


def save_discriminator(path, variables) -> None:
  save_state_dict(path, export_discriminator(variables))
