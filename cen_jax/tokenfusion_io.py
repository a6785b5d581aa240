"""Official TokenFusion (yikaiw/TokenFusion semantic_segmentation, `WeTr`) state_dicts <-> Flax
variables of `models.segformer.TokenFusionSegmenter`. numpy only: torch reads and writes the
files (`torch_io.load_state_dict`, `torch_io.save_state_dict`).

Name rule (Flax path -> torch key; official checkpoints are saved from nn.DataParallel, so every
key may also start with 'module.'; both forms are read):
  a module path maps name by name, except  block{s}_{i} -> block{s}.{i},
                                           score_predictor_{s} -> score_predictor.{s}.score_nets
  leaves: kernel -> weight (Linear [I, O] -> [O, I]; conv [kH, kW, I, O] -> [O, I, kH, kW]),
          scale -> weight, bias -> bias; batch_stats mean, var -> running_mean, running_var
  encoder Linear / Conv (shared, official ModuleParallel): <module>.module.<leaf>
      except the depth-wise conv (official DWConv):   mlp.dwconv -> mlp.dwconv.dwconv.<leaf>
  encoder LayerNorm [M, C] (private, LayerNormParallel): <module>.ln_{m}.<leaf>, one key per m
  score predictor [M, ...] (one MLP per branch):   score_predictor.{s}.score_nets.{m}.{j}.<leaf>
      j = 0 (norm), 1 (fc1), 3 (fc2), 5 (fc3), 7 (fc4): the nn.Sequential indices
  decoder (plain modules, shared by the branches):  decoder.<module>.<leaf>
      (linear_c{s}.proj, linear_fuse.conv, linear_fuse.bn, linear_pred)
  alpha [M]                                          alpha
e.g. encoder/block1_0/attn/q/kernel <-> encoder.block1.0.attn.q.module.weight (transposed),
encoder/block2_1/norm1/scale [M, C] <-> encoder.block2.1.norm1.ln_{m}.weight.
num_batches_tracked is ignored on import and written as 0 on export.

The official ImageNet MiT weights (pretrained/mit_bX.pth, `import_mit_imagenet`) use the
encoder's names without 'encoder.', '.module' and '.ln_{m}': every branch's LayerNorm starts
from the same one (official `expand_state_dict`); the score predictors keep their init and
head.* is ignored.

The official translation networks (image2image_translation: MixVisionTransformerGen / Dis,
checkpoint-gen-*.pkl / checkpoint-dis-*.pkl, torch.save of the DataParallel state_dict) <-> Flax
variables of `models.mit_translation.MiTGenerator` / `MiTDiscriminator`
(`import_translation_generator`, ...; `translation_torch_keys` lists the map). No 'encoder.'
prefix; the same leaves as above, and
  {patch_embed_enc,block_enc,norm_enc,patch_embed_dec,block_dec,norm_dec}_{s}[_{i}]
                               -> <that name>.{s}[.{i}]
  score_predictor_{s}          -> score_predictor.{s}.score_nets.{m}.{j}   (as above)
  Linear / Conv (shared, ModuleParallel), project included:  <module>.module.<leaf>
  the depth-wise conv (DWConv.dwconv is a ModuleParallel):   mlp.dwconv.dwconv.module.<leaf>
  LayerNorm [M, C] (LayerNormParallel):                     <module>.lrnorm_{m}.<leaf>
      (norm, norm1, norm2, norm_enc.{s}, norm_dec.{k}; PatchUpsample's unused norm too)
  alpha [M] (generator)                                     alpha
e.g. block_enc_4_1/attn/kv/kernel <-> block_enc.4.1.attn.kv.module.weight (transposed).
"""

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from cen_jax.torch_io import (DP_PREFIX, CheckpointError, flatten_tree, set_in_tree,
                              strip_dp_prefix)

PREDICTOR_LAYERS = {'norm': 0, 'fc1': 1, 'fc2': 3, 'fc3': 5, 'fc4': 7}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
          'var': 'running_var'}
PRIVATE_NORM = re.compile(r'norm\d?')  # the encoder's LayerNormParallel modules
IMAGENET_HEAD = ('head.weight', 'head.bias')


@dataclasses.dataclass(frozen=True)
class Slot:
  collection: str  # 'params' | 'batch_stats'
  path: tuple  # inside the collection
  kind: str  # 'dense' ([I, O] <-> [O, I]), 'conv' (HWIO <-> OIHW), 'plain'
  private: bool  # leaf [M, ...] <-> one torch key per branch
  keys: tuple  # torch keys, no DataParallel prefix
  shape: tuple  # the Flax leaf's shape


def torch_module_name(path) -> str:
  """Flax module path -> official torch module path (see the rule above)."""
  parts = []
  for name in path:
    block = re.fullmatch(r'block(\d+)_(\d+)', name)
    predictor = re.fullmatch(r'score_predictor_(\d+)', name)
    if block:
      parts += [f'block{block[1]}', block[2]]
    elif predictor:
      parts += ['score_predictor', predictor[1], 'score_nets']
    else:
      parts.append(name)
  return '.'.join(parts)


def _slot(collection, path, shape) -> Slot:
  *module, leaf = path
  if path == ('alpha',):
    return Slot(collection, path, 'plain', False, ('alpha',), shape)
  if leaf not in LEAVES:
    raise CheckpointError(f'no PyTorch name for model variable {collection}/{"/".join(path)}')
  name, torch_leaf = torch_module_name(module), LEAVES[leaf]
  encoder = module[0] == 'encoder'
  predictor = encoder and module[1].startswith('score_predictor_')
  private = predictor or (encoder and PRIVATE_NORM.fullmatch(module[-1]) is not None)
  rank = len(shape) - private
  kind = 'plain' if leaf != 'kernel' else ('conv' if rank == 4 else 'dense')
  if predictor:
    prefix = torch_module_name(module[:2])
    keys = tuple(f'{prefix}.{m}.{PREDICTOR_LAYERS[module[2]]}.{torch_leaf}'
                 for m in range(shape[0]))
  elif private:
    keys = tuple(f'{name}.ln_{m}.{torch_leaf}' for m in range(shape[0]))
  elif encoder:
    wrapper = 'dwconv' if module[-1] == 'dwconv' else 'module'
    keys = (f'{name}.{wrapper}.{torch_leaf}',)
  else:
    keys = (f'{name}.{torch_leaf}',)
  return Slot(collection, tuple(path), kind, private, keys, tuple(shape))


def slots(variables, slot=_slot) -> list:
  """Every leaf of `variables` ({'params', 'batch_stats'}) with its torch key(s) (`slot`: the
  segmenter's naming, or `_translation_slot`)."""
  return [slot(collection, path, tuple(np.shape(leaf)))
          for collection in ('params', 'batch_stats') if collection in variables
          for path, leaf in flatten_tree(variables[collection])]


def mit_torch_keys(variables) -> dict:
  """{Flax 'collection/path': (torch key, ...)} of every leaf: the mapping, for reading."""
  return {'/'.join((s.collection,) + s.path): s.keys for s in slots(variables)}


def official_param_group(path: str):
  """The official optimiser group (WeTr.get_param_groups) of the parameter at Flax path
  'encoder/...' or 'decoder/...': 'encoder' (weight decay 0.01), 'encoder_norm' (torch name
  contains 'norm': no weight decay; the score nets' LayerNorms are named '....0.weight', so
  they stay in 'encoder'), 'decoder' (10x learning rate); None for alpha, which is in no group:
  the official optimiser never updates it (the ensemble stays the plain mean)."""
  parts = tuple(path.split('/'))
  if parts[0] == 'decoder':
    return 'decoder'
  if parts[0] != 'encoder':
    return None
  keys = _slot('params', parts, (2,) * 4).keys  # the shape only picks kernel kinds
  return 'encoder_norm' if 'norm' in keys[0] else 'encoder'


def _from_torch(kind, array):
  if kind == 'conv':
    return array.transpose(2, 3, 1, 0)
  return array.T if kind == 'dense' else array


def _to_torch(kind, array):
  if kind == 'conv':
    return array.transpose(3, 2, 0, 1)
  return array.T if kind == 'dense' else array


def _torch_shape(slot: Slot) -> tuple:
  inner = slot.shape[1:] if slot.private else slot.shape
  return tuple(_to_torch(slot.kind, np.empty(inner, np.uint8)).shape)


def _import(state_dict, variables, key_of, ignored, slot=_slot) -> dict:
  """New variables with every slot read from `state_dict` under key_of(torch key); checks that
  every checkpoint key is used (except `ignored(key)`) and every shape fits."""
  names = strip_dp_prefix(state_dict)
  wanted = {}
  for s in slots(variables, slot):
    for key in s.keys:
      wanted.setdefault(key_of(key), []).append((s, key))
  for bare, key in names.items():
    if bare not in wanted and not ignored(bare):
      raise CheckpointError(f'checkpoint key {key!r} is not in the model')
  out = {c: _copy_tree(tree) for c, tree in variables.items()}
  for s in slots(variables, slot):
    arrays = []
    for key in s.keys:
      source = key_of(key)
      if source not in names:
        raise CheckpointError(f'checkpoint lacks key {source!r} (shape {_torch_shape(s)}) '
                              f'that the model expects')
      array = np.asarray(state_dict[names[source]])
      if array.shape != _torch_shape(s):
        raise CheckpointError(f'checkpoint key {names[source]!r} has shape {array.shape} but '
                              f'the model expects {_torch_shape(s)}')
      arrays.append(_from_torch(s.kind, array))
    leaf = np.stack(arrays) if s.private else arrays[0]
    dtype = np.dtype(getattr(_get(variables[s.collection], s.path), 'dtype', np.float32))
    set_in_tree(out[s.collection], s.path, np.array(leaf, dtype=dtype, order='C'))  # a copy
  return out


def import_tokenfusion(state_dict, variables) -> dict:
  """An official TokenFusion WeTr state_dict (with or without 'module.') into `variables`
  ({'params', 'batch_stats'} of TokenFusionSegmenter; arrays or ShapeDtypeStructs). Every
  model leaf must be found and every checkpoint key used (but num_batches_tracked)."""
  return _import(state_dict, variables, lambda key: key,
                 lambda key: key.endswith('num_batches_tracked'))


def imagenet_key(key: str) -> str:
  """Official WeTr encoder key -> its name in the ImageNet MiT checkpoint (or '' for keys it
  lacks: the score predictors and everything outside the encoder)."""
  if not key.startswith('encoder.') or key.startswith('encoder.score_predictor.'):
    return ''
  key = key.removeprefix('encoder.').replace('.module.', '.')
  return re.sub(r'\.ln_\d+\.', '.', key)


def import_mit_imagenet(state_dict, variables) -> dict:
  """The official ImageNet MiT weights (mit_bX.pth) into the encoder of `variables`: each
  branch's LayerNorm gets the same one; score predictors, decoder and alpha keep theirs."""
  encoder_only = {'params': {'encoder': variables['params']['encoder']}}
  loaded = _import(state_dict, {'params': _drop_predictors(encoder_only['params'])},
                   imagenet_key, lambda key: key in IMAGENET_HEAD)
  out = {c: _copy_tree(tree) for c, tree in variables.items()}
  for path, leaf in flatten_tree(loaded['params']):
    set_in_tree(out['params'], path, leaf)
  return out


def _drop_predictors(params) -> dict:
  encoder = {k: v for k, v in params['encoder'].items() if not k.startswith('score_predictor_')}
  return {'encoder': encoder}


def export_tokenfusion(variables, prefix: str = DP_PREFIX) -> dict:
  """{prefix + torch key: np.ndarray} of the whole model (prefix 'module.': the official
  DataParallel checkpoints), num_batches_tracked written as int64 0 after each running_var."""
  return _export(variables, prefix, _slot)


def _export(variables, prefix, slot) -> dict:
  out = {}
  for s in slots(variables, slot):
    leaf = np.asarray(_get(variables[s.collection], s.path))
    arrays = list(leaf) if s.private else [leaf]
    for key, array in zip(s.keys, arrays):
      out[prefix + key] = np.ascontiguousarray(_to_torch(s.kind, array))
      if key.endswith('.running_var'):
        out[prefix + key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def _copy_tree(tree):
  if isinstance(tree, Mapping):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return tree


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# ----------------------------------------------------------------------------- translation

TRANSLATION_LIST = re.compile(
    r'(patch_embed_enc|patch_embed_dec|block_enc|block_dec|norm_enc|norm_dec)_(\d+)(?:_(\d+))?')
TRANSLATION_PRIVATE_NORM = re.compile(r'norm\d?|norm_(enc|dec)_\d+')


def translation_module_name(path) -> str:
  """Flax module path of MiTGenerator / MiTDiscriminator -> official torch module path."""
  parts = []
  for name in path:
    listed = TRANSLATION_LIST.fullmatch(name)
    predictor = re.fullmatch(r'score_predictor_(\d+)', name)
    if listed:
      parts += [index for index in listed.groups() if index is not None]
    elif predictor:
      parts += ['score_predictor', predictor[1], 'score_nets']
    else:
      parts.append(name)
  return '.'.join(parts)


def _translation_slot(collection, path, shape) -> Slot:
  *module, leaf = path
  if path == ('alpha',):
    return Slot(collection, path, 'plain', False, ('alpha',), shape)
  if collection != 'params' or leaf not in LEAVES or not module:
    raise CheckpointError(f'no PyTorch name for model variable {collection}/{"/".join(path)}')
  name, torch_leaf = translation_module_name(module), LEAVES[leaf]
  predictor = module[0].startswith('score_predictor_')
  private = predictor or TRANSLATION_PRIVATE_NORM.fullmatch(module[-1]) is not None
  rank = len(shape) - private
  kind = 'plain' if leaf != 'kernel' else ('conv' if rank == 4 else 'dense')
  if predictor:
    prefix = translation_module_name(module[:1])
    keys = tuple(f'{prefix}.{m}.{PREDICTOR_LAYERS[module[1]]}.{torch_leaf}'
                 for m in range(shape[0]))
  elif private:
    keys = tuple(f'{name}.lrnorm_{m}.{torch_leaf}' for m in range(shape[0]))
  elif module[-1] == 'dwconv':  # DWConv.dwconv = ModuleParallel(Conv2d)
    keys = (f'{name}.dwconv.module.{torch_leaf}',)
  else:
    keys = (f'{name}.module.{torch_leaf}',)
  return Slot(collection, tuple(path), kind, private, keys, tuple(shape))


def translation_torch_keys(variables) -> dict:
  """{Flax 'params/path': (torch key, ...)} of every leaf of a MiTGenerator / MiTDiscriminator."""
  return {'/'.join((s.collection,) + s.path): s.keys
          for s in slots(variables, _translation_slot)}


def import_translation(state_dict, variables) -> dict:
  """An official translation generator or discriminator state_dict (with or without
  'module.') into `variables` ({'params'}; arrays or ShapeDtypeStructs). Every model leaf must
  be found, every checkpoint key used, every shape fit (one-line CheckpointError naming the
  key otherwise)."""
  return _import(state_dict, variables, lambda key: key, lambda key: False, _translation_slot)


def export_translation(variables, prefix: str = DP_PREFIX) -> dict:
  """{prefix + torch key: np.ndarray} of a MiTGenerator / MiTDiscriminator (prefix 'module.':
  what the official main.py saves, torch.save(G.state_dict()) of nn.DataParallel)."""
  return _export(variables, prefix, _translation_slot)


def import_translation_generator(state_dict, variables) -> dict:
  """Official checkpoint-gen-*.pkl state_dict -> MiTGenerator variables (`import_translation`)."""
  return import_translation(state_dict, variables)


def export_translation_generator(variables, prefix: str = DP_PREFIX) -> dict:
  """MiTGenerator variables -> the official checkpoint-gen-*.pkl state_dict."""
  return export_translation(variables, prefix)


def import_translation_discriminator(state_dict, variables) -> dict:
  """Official checkpoint-dis-*.pkl state_dict -> MiTDiscriminator variables."""
  return import_translation(state_dict, variables)


def export_translation_discriminator(variables, prefix: str = DP_PREFIX) -> dict:
  """MiTDiscriminator variables -> the official checkpoint-dis-*.pkl state_dict."""
  return export_translation(variables, prefix)
