"""Orbax checkpoints: the latest N plus the best by the task's metric, with the data-iterator state.

Layout: `<workdir>/checkpoints/<step>/{state, meta, data}`:
- state: TrainState (params, batch_stats, opt_state, step) as replicated global arrays, so a
  checkpoint restores on any device count (the restore target carries today's shardings);
  eval and predict read all but opt_state (`Checkpoints.restore_weights`);
- meta: JSON with parameter shapes, modalities, the config and eval metrics (used to refuse a
  workdir that holds another model and to find the best step);
- data: one JSON file per process with its input iterator's state (grain's handler), so that a
  resumed run reads exactly the batches it would have read.
"""

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Optional

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


class CheckpointError(ValueError):
  """No checkpoint of the workdir can be restored (message names each step and why)."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint step's files are shown to be damaged (raised where orbax's own error does
  not say so, e.g. a step without the input position it should hold)."""


# tensorstore's status codes for a file that is missing, shorter than its index says, or whose
# bytes fail to decode or to match their checksum.
_DAMAGE_CODES = ('NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS')


def is_damage(error: BaseException) -> bool:
  """True when `error` (or what it was raised from) shows damaged checkpoint files: a missing
  or truncated file, or one whose content does not decode or fails its checksum. Anything
  else (out of memory, an I/O error of the storage, a bug) is not damage."""
  while error is not None:
    if isinstance(error, (DamagedCheckpointError, FileNotFoundError, json.JSONDecodeError,
                          UnicodeDecodeError)):
      return True
    text = str(error.args[0]) if error.args else ''
    if type(error) is ValueError and text.split(':', 1)[0] in _DAMAGE_CODES:
      return True
    if type(error) is KeyError and 'was not found in the checkpoint' in text:
      return True  # a whole item (state/, meta/) is missing
    error = error.__cause__
  return False


def failure_reason(error: BaseException, limit: int = 160) -> str:
  """One short line for why a checkpoint failed to restore (tensorstore errors run to pages;
  the whole error goes to the workdir's restore log)."""
  text = ' '.join(str(error).split()) or type(error).__name__
  text = text.split(' [tensorstore_spec')[0]
  found = re.search(r'.*local file "([^"]+)": (.*)', text)  # the innermost file and error
  if found:  # '... of local file "F": Requested byte range [0, 28010) is not valid ...'
    text = f'{found.group(1)}: {found.group(2)}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


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


def check_same_shapes(expected, found, where: str) -> None:
  """Raise a one-line error naming the first leaf of `found` whose shape or dtype is not
  `expected`'s."""
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                               jax.tree.leaves(found)):
    if np.shape(got) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise IncompatibleCheckpointError(
          f'{where}: {path_str(path)} is {np.dtype(got.dtype).name}{_shape_str(np.shape(got))}, '
          f'the model has {np.dtype(want.dtype).name}{_shape_str(want.shape)}')


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
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    if not read_only:  # eval and predict never touch the input position: no grain import
      import grain  # pylint: disable=g-import-not-at-top
      handlers['data'] = grain.checkpoint.CheckpointHandler()
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

  def _readable_meta(self, step: int) -> Optional[dict]:
    """The step's meta, or None when its files are damaged (restore_first_intact reports
    those); any other error is raised."""
    try:
      return self.meta(step)
    except Exception as e:
      if is_damage(e):
        return None
      raise

  def best_step(self) -> Optional[int]:
    """The step with the best metric among kept checkpoints (latest if none has one)."""
    scored = []
    for step in self.all_steps():
      meta = self._readable_meta(step) or {}
      scored.append((self.sign * meta.get('metrics', {}).get(self.best_metric,
                                                              self.sign * -np.inf), step))
    if not scored:
      return None
    best = max(scored)
    return best[1] if np.isfinite(best[0]) else self.latest_step()

  def check_compatible(self, expected_meta: dict, workdir: str) -> None:
    for step in sorted(self.all_steps(), reverse=True):  # the newest step whose meta reads
      meta = self._readable_meta(step)
      if meta is not None:
        check_same_model(expected_meta, meta, f'workdir {workdir!r}')
        return

  def restore_first_intact(self, steps, abstract_state: Any, *, data_iterator=None,
                           set_aside: bool = False, weights_only: bool = False):
    """(state, step) of the first of `steps` that restores (`weights_only`: see
    `restore_weights`).

    A step whose files are damaged (`is_damage`: a truncated or missing file, a failed
    checksum) is reported in one line on stderr, with its whole error and what the storage
    layer printed in <workdir>/restore_errors.log, and the next step is tried; with
    `set_aside` such steps move to <workdir>/checkpoints_corrupt/ (kept, not deleted) so that
    training can save those step numbers again. Any other error (out of memory, an I/O error, a
    bug) is raised as it is, with nothing moved. Raises CheckpointError when no step restores.
    """
    failures = []
    for step in steps:
      try:
        with _stderr_kept_unless_failed() as captured:
          self.meta(step)  # a step whose meta is damaged is damaged
          state = self.restore_weights(step, abstract_state) if weights_only else \
              self.restore(step, abstract_state, data_iterator=data_iterator)
      except Exception as e:
        if not is_damage(e):
          sys.stderr.write(captured.get('stderr', ''))
          raise
        failures.append((step, failure_reason(e)))
        _DAMAGED_STEP_NOISE.add(os.path.join(self.directory, str(step), ''))
        log = self._log_failure(step, e, captured.get('stderr', ''))
        print(f'warning: checkpoint step {step} cannot be restored ({failures[-1][1]}); '
              f'trying an older one{log}', file=sys.stderr)
        continue
      if set_aside and failures:
        self._set_aside([s for s, _ in failures])
      return state, step
    where = self.directory
    raise CheckpointError(f'no intact checkpoint in {where}: ' + '; '.join(
        f'step {s}: {reason}' for s, reason in failures) if failures else
        f'no checkpoint in {where}')

  def _log_failure(self, step: int, error: BaseException, printed: str) -> str:
    """Appends the whole error and the storage layer's output to <workdir>/restore_errors.log;
    returns ' (details: PATH)', or '' when the log cannot be written."""
    import datetime
    import traceback
    path = os.path.join(os.path.dirname(self.directory), 'restore_errors.log')
    try:
      with open(path, 'a') as f:
        f.write(f'=== {datetime.datetime.now().isoformat(timespec="seconds")} step {step} in '
                f'{self.directory}\n')
        f.write(''.join(traceback.format_exception(error)))
        if printed.strip():
          f.write('--- printed by the storage layer during the restore:\n' + printed)
        f.write('\n')
    except OSError:
      return ''
    return f' (details: {path})'

  def _set_aside(self, steps) -> None:
    """Moves `steps` to checkpoints_corrupt/: process 0 moves them (one shared workdir), every
    process waits for it and reloads its step list."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'checkpoints_corrupt')
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
          target = f'{target}.{len(os.listdir(aside))}'
        shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('cen_jax checkpoints set aside')
    self.manager.reload()

  def save(self, step: int, state, meta: dict, *, data_iterator=None,
           metrics: Optional[dict] = None) -> None:
    meta = dict(meta, step=int(step))
    if metrics is not None:
      meta['metrics'] = {k: float(v) for k, v in metrics.items()}
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      import grain  # pylint: disable=g-import-not-at-top: imported by __init__ already
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
    self.manager.save(step, args=ocp.args.Composite(**items),
                      metrics=meta.get('metrics'), force=True)

  def restore(self, step: int, abstract_state: Any, *, data_iterator=None):
    """Restore the state onto `abstract_state`'s shardings; set `data_iterator`'s position.

    Exact resume needs the input position saved with the step: a step without one (other than
    an imported step 0, where the input starts from its beginning anyway) is damaged, and a
    position saved by another number of processes raises CheckpointError."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_dir = os.path.join(self.directory, str(step), 'data')
      if not os.path.isdir(data_dir):
        if step != 0:
          raise DamagedCheckpointError(f'{data_dir}: missing (the input position of step {step})')
      else:
        process, count = jax.process_index(), jax.process_count()
        mine = os.path.join(data_dir, f'process_{process}-of-{count}.json')
        if not os.path.isfile(mine):
          saved = sorted(os.listdir(data_dir))
          if any(re.fullmatch(r'process_\d+-of-\d+\.json', name) and
                 not name.endswith(f'-of-{count}.json') for name in saved):
            raise CheckpointError(
                f'{data_dir}: the input position was saved by another number of processes '
                f'({", ".join(saved)}) than this run has ({count}); exact resume needs the same '
                f'process count')
          raise DamagedCheckpointError(f'{mine}: missing (the input position of step {step})')
        import grain  # pylint: disable=g-import-not-at-top: imported by __init__ already
        self.manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))))
    return restored['state']

  def restore_weights(self, step: int, abstract_state: Any):
    """`abstract_state` (a TrainState) with its step, params and batch_stats read from `step`
    as host arrays and its optimiser state left on disk (None): what eval and predict use. It
    reads half the arrays and places none of them, about a fifth of `restore`'s time."""
    fields = ('step', 'params', 'batch_stats')
    item = {name: getattr(abstract_state, name) for name in fields}
    host = jax.tree.map(lambda unused: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), 'state'),
        args=ocp.args.PyTreeRestore(item=item, restore_args=host, partial_restore=True))
    check_same_shapes(item, restored, os.path.join(self.directory, str(step)))
    return abstract_state.replace(opt_state=None, **restored)

  def wait(self):
    if self.manager:
      self.manager.wait_until_finished()

  def close(self):
    if self.manager:
      self.manager.wait_until_finished()
      self.manager.close()


@contextlib.contextmanager
def _stderr_kept_unless_failed():
  """Buffers file descriptor 2 for the duration of a restore and yields a dict. If the restore
  succeeds, anything printed is passed on. If it fails, what the storage layer printed is not
  shown but kept in the dict's 'stderr' for the restore log: orbax's pending reads and
  tensorstore's callbacks then print pages of tracebacks ('Task exception was never retrieved',
  'Event loop is closed') from other threads, and the caller says what went wrong in one line
  (or raises the error, when it is not damage)."""
  import gc
  import tempfile
  sys.stderr.flush()
  saved = os.dup(2)
  captured = {}
  with tempfile.TemporaryFile() as buffer:
    os.dup2(buffer.fileno(), 2)
    failed = True
    try:
      yield captured
      failed = False
    finally:
      if failed:
        gc.collect()  # reports the orphaned read tasks now, into the buffer
        _wait_until_quiet(buffer)  # the other threads' callbacks print for a moment
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      buffer.seek(0)
      printed = buffer.read().decode(errors='replace')
      if failed:
        captured['stderr'] = printed
      else:
        sys.stderr.write(printed)
        sys.stderr.flush()


class _DamagedStepLogFilter(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' records about a checkpoint step
  that restore_first_intact has already reported. orbax's other read tasks for that step fail
  too, and their exceptions are logged whenever the tasks are garbage collected, which can be
  after the restore attempt's stderr buffer is gone (seen on a loaded 2-core CI machine)."""

  def __init__(self):
    super().__init__()
    self.step_dirs = set()

  def add(self, step_dir: str) -> None:
    if not self.step_dirs:
      logging.getLogger('asyncio').addFilter(self)
    self.step_dirs.add(step_dir)

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return not any(step_dir in text for step_dir in self.step_dirs)


_DAMAGED_STEP_NOISE = _DamagedStepLogFilter()


def _wait_until_quiet(file, interval: float = 0.15, limit: float = 5.0) -> None:
  """Returns once `file` has stopped growing for `interval` seconds (or after `limit`)."""
  import time
  size, waited = -1, 0.0
  while waited < limit:
    current = os.fstat(file.fileno()).st_size
    if current == size:
      return
    size = current
    time.sleep(interval)
    waited += interval


def abstract_like(tree, sharding):
  """ShapeDtypeStructs of `tree` placed with `sharding` (the current device layout)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)
