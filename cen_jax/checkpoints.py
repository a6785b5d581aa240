"""Orbax checkpoints: the latest N plus the best by the task's metric, with the data-iterator state.

Layout: `<workdir>/checkpoints/<step>/{state, meta, data}`:
- state: TrainState (params, batch_stats, opt_state, step) as replicated global arrays, so a
  checkpoint restores on any device count (the restore target carries today's shardings);
- meta: JSON with parameter shapes, modalities, the config and eval metrics (used to refuse a
  workdir that holds another model and to find the best step);
- data: one JSON file per process with its input iterator's state (grain's handler), so that a
  resumed run reads exactly the batches it would have read.
"""

import base64
import json
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cen_jax.models import path_str

BEST_METRIC = 'ensemble_miou'  # segmentation's; a task passes its own to Checkpoints


def param_shapes(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(path): list(np.shape(leaf)) for path, leaf in flat}


def model_meta(config, params) -> dict:
  return {'param_shapes': param_shapes(params), 'modalities': list(config.modalities),
          'fusion': config.model.fusion, 'config': config.to_json_best_effort()}


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of another model (message names the first difference)."""


def check_same_model(expected: dict, found: dict, where: str) -> None:
  """Raise a one-line error naming the first difference between two model_meta dicts."""
  if found.get('modalities') != expected['modalities']:
    raise IncompatibleCheckpointError(
        f'{where} holds a checkpoint for modalities {found.get("modalities")}, '
        f'but the config has {expected["modalities"]}')
  theirs, ours = found.get('param_shapes', {}), expected['param_shapes']
  for key in sorted(set(theirs) | set(ours)):
    if theirs.get(key) != ours.get(key):
      raise IncompatibleCheckpointError(
          f'{where} holds a checkpoint of another model: parameter {key!r} has shape '
          f'{_shape_str(theirs.get(key))} there but {_shape_str(ours.get(key))} in this config')


def _shape_str(shape):
  return 'absent' if shape is None else str(tuple(shape))


class _IteratorState:
  """Adapter for grain's orbax handler: snapshots a state at save time (the save itself may
  run later in a background thread) and sets a live iterator's state on restore."""

  def __init__(self, iterator=None, state=None):
    self.iterator = iterator
    self.state = state if state is not None else (
        _encode_state(iterator.get_state()) if iterator is not None else None)

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes):
    self.iterator.set_state(_decode_state(state))

  def start_prefetch(self):
    """Called by grain's handler after set_state; our iterators start reading on next()."""


def _encode_state(state) -> bytes:
  if isinstance(state, bytes):
    return json.dumps({'bytes': base64.b64encode(state).decode()}).encode()
  return json.dumps({'json': state}).encode()


def _decode_state(blob: bytes):
  data = json.loads(blob)
  return base64.b64decode(data['bytes']) if 'bytes' in data else data['json']


class Checkpoints:
  """Thin wrapper over ocp.CheckpointManager for one workdir."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False, best_metric: str = BEST_METRIC,
               best_mode: str = 'max'):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.best_metric = best_metric
    self.sign = 1.0 if best_mode == 'max' else -1.0  # best = highest sign * metric
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: self.sign * m[best_metric],
                                  reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler(),
                'data': grain.checkpoint.CheckpointHandler()}
    if read_only and not os.path.isdir(self.directory):
      self.manager = None
    else:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps()) if self.manager else []

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return max(steps) if steps else None

  def meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def best_step(self) -> Optional[int]:
    """The step with the best metric among kept checkpoints (latest if none has one)."""
    scored = [(self.sign * self.meta(s).get('metrics', {}).get(self.best_metric,
                                                                self.sign * -np.inf), s)
              for s in self.all_steps()]
    if not scored:
      return None
    best = max(scored)
    return best[1] if np.isfinite(best[0]) else self.latest_step()

  def check_compatible(self, expected_meta: dict, workdir: str) -> None:
    step = self.latest_step()
    if step is not None:
      check_same_model(expected_meta, self.meta(step), f'workdir {workdir!r}')

  def save(self, step: int, state, meta: dict, *, data_iterator=None,
           metrics: Optional[dict] = None) -> None:
    meta = dict(meta, step=int(step))
    if metrics is not None:
      meta['metrics'] = {k: float(v) for k, v in metrics.items()}
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
    self.manager.save(step, args=ocp.args.Composite(**items),
                      metrics=meta.get('metrics'), force=True)

  def restore(self, step: int, abstract_state: Any, *, data_iterator=None):
    """Restore the state onto `abstract_state`'s shardings; set `data_iterator`'s position."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      try:
        self.manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))))
      except (ValueError, FileNotFoundError, KeyError) as e:  # e.g. another process count
        print(f'warning: data iterator state not restored ({e}); input restarts its order')
    return restored['state']

  def wait(self):
    if self.manager:
      self.manager.wait_until_finished()

  def close(self):
    if self.manager:
      self.manager.wait_until_finished()
      self.manager.close()


def abstract_like(tree, sharding):
  """ShapeDtypeStructs of `tree` placed with `sharding` (the current device layout)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)
