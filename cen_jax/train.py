"""The runner: pmap/shard_map runners, distributed set-up, and the train/eval loop with
checkpoints, logging and previews. Task-agnostic: what one application owns (model, loss and
step, samples, evaluation metrics, previews) lives in cen_jax/tasks/<config.task>.py, and what
tasks and runner share (train state, device batches, the evaluate loop) in cen_jax/runtime.py.

`jax.pmap` (default) or `jax.shard_map` over a device Mesh runs a task's per-device step
(`config.train.parallel`), with its collectives on the named axis `AXIS`.
"""

import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cen_jax import checkpoints as ckpt_lib
from cen_jax import compile_cache
from cen_jax import host_memory
from cen_jax import input_pipeline
from cen_jax import run_log as log_lib
from cen_jax import runtime
from cen_jax import tasks
from cen_jax.fusion import registry
from cen_jax.runtime import (AXIS, TrainState, batch_specs, device_batch, global_replicated,
                             keep_finite_update, put_replicated, replicated_sharding)


def _task(config):
  return tasks.get(config)


def check_config(config):
  registry.load_user_module(config.model.get('fusion_module', ''))
  registry.get(config.model.fusion)  # one line naming the registered fusions if unknown
  if config.train.parallel not in ('pmap', 'shard_map'):
    raise ValueError(f"config.train.parallel={config.train.parallel!r}: expected 'pmap' or "
                     f"'shard_map'")
  _task(config).check_config(config)


def build(config, *, axis_name=AXIS):
  """The task's model(s), after checking the config."""
  check_config(config)
  return _task(config).build(config, axis_name=axis_name)


def init_variables(config, model, rng):
  return _task(config).init_variables(config, model, rng)


def create_state(config, model, rng) -> TrainState:
  task = _task(config)
  return task.state_from_variables(config, task.init_variables(config, model, rng))


def stage_starts(config, steps_per_epoch: int) -> list[int]:
  return _task(config).stage_starts(config, steps_per_epoch)


# ----------------------------------------------------------------------------- runners

def batch_keys(config) -> tuple:
  """The task's host-batch keys besides the stacked inputs."""
  task = _task(config)
  return tuple(task.batch_keys(config) if hasattr(task, 'batch_keys') else task.BATCH_KEYS)


class Runner:
  """Runs the task's per-device train step with jax.pmap or jax.shard_map over all devices.

  `step(state, host_batch)` takes this process's share of the global batch as numpy.
  """

  def __init__(self, config, model, starts, devices=None):
    self.config = config
    self.keys = batch_keys(config)
    self.devices = list(devices or jax.devices())
    self.kind = config.train.parallel
    self.num_local = sum(d.process_index == jax.process_index() for d in self.devices)
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    fn = _task(config).make_train_step(config, model, starts)
    if config.train.get('skip_nonfinite', False):
      fn = _skipping_nonfinite(fn)
    if self.kind == 'pmap':
      self._step = jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, None),
                            donate_argnums=(0,), devices=self.devices)
    else:
      specs = batch_specs(self.keys)
      # check_vma=False: grads of replicated params are not psum'd implicitly, so the step's
      # explicit psum is the only reduction (with vma checking on it would count N times).
      mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), specs),
                             out_specs=(P(), P()), check_vma=False)
      self._step = jax.jit(mapped, donate_argnums=(0,))
      self.batch_sharding = {k: NamedSharding(self.mesh, s) for k, s in specs.items()}

    self.compiled = None
    self._keep_top = None  # CPU: host bytes kept at the top of the heap after each step

  def place_state(self, state):
    return put_replicated(state, self.replicated)

  def compile(self, abstract_state, host_batch) -> None:
    """Compiles the step for this state's shapes (jax.ShapeDtypeStructs are enough) and this
    host batch's, so that it can be done before the state exists: XLA's compile then does not
    add its working memory on top of the parameters and the optimiser state (about 850 MiB
    of the RefineNet-R50 step's peak at 128x128, docs/benchmarks.md "Host memory")."""
    if self.kind == 'pmap' and jax.process_count() > 1:
      return  # pmap puts every argument across processes, so it lowers concrete values only
    if self.kind != 'pmap':
      abstract_state = ckpt_lib.abstract_like(abstract_state, self.replicated)
    self.compiled = self._step.lower(abstract_state, self._device_batch(host_batch)).compile()
    host_memory.release_freed_host_memory()  # the compiler's working memory, before the state
    memory = self.compiled.memory_analysis()
    if memory is not None and jax.default_backend() == 'cpu':
      self._keep_top = memory.temp_size_in_bytes + (64 << 20)

  def _device_batch(self, host_batch):
    if self.kind == 'pmap':
      return device_batch(self.config, host_batch, self.num_local, for_pmap=True,
                          keys=self.keys)
    batch = device_batch(self.config, host_batch, 0, for_pmap=False, keys=self.keys)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding[k], v)
            for k, v in batch.items()}

  def step(self, state, host_batch):
    step = self._step if self.compiled is None else self.compiled
    out = step(state, self._device_batch(host_batch))
    if self._keep_top is not None:  # a temporaries block stranded below the heap's top, if any
      host_memory.release_freed_host_memory(keep_top=self._keep_top)
    return out


def _skipping_nonfinite(step_fn):
  def step(state, batch):
    new_state, scalars = step_fn(state, batch)
    return keep_finite_update(new_state, state, scalars['finite']), scalars
  return step


# ----------------------------------------------------------------------------- loop

def maybe_initialize_distributed(config):
  """jax.distributed.initialize when the config or the environment asks for it."""
  d = config.get('distributed')
  if d is None or jax.distributed.is_initialized():
    return
  if d.initialize:
    kwargs = {}
    if d.coordinator_address:
      kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                    process_id=d.process_id)
    jax.distributed.initialize(**kwargs)


PREPARE_TIMEOUT_HOURS = 48  # how long processes other than 0 wait for its prepare


def prepare_dataset(config) -> str:
  """`input_pipeline.prepare` once for all processes: process 0 prepares (a no-op when the
  dataset is there) while the others wait for it, so one process writes; then the others find
  the dataset (shared filesystem) or prepare their own copy (a data_dir local to each host).
  If process 0 fails, the others stop with one line instead of waiting. Returns the prepared
  directory."""
  if jax.process_count() == 1:
    return input_pipeline.prepare(config)
  from jax._src import distributed  # the coordination service's key-value store (as orbax)
  client = distributed.global_state.client
  _prepare_calls[0] += 1  # every process calls this the same number of times
  key = f'cen_jax/prepare/{_prepare_calls[0]}'
  if jax.process_index() == 0:
    try:
      directory = input_pipeline.prepare(config)
    except BaseException as e:
      client.key_value_set(key, f'{type(e).__name__}: {e}'.splitlines()[0])
      raise
    client.key_value_set(key, 'ok')
    return directory
  status = client.blocking_key_value_get(key, PREPARE_TIMEOUT_HOURS * 3600 * 1000)
  if status != 'ok':
    raise ValueError(f'process 0 failed to prepare {config.data.name!r} ({status})')
  return input_pipeline.prepare(config)


_prepare_calls = [0]


def initial_state(config, model) -> TrainState:
  """Fresh state (with any pretrained weights the config names), replicated on every device."""
  task = _task(config)
  variables = task.initial_state_variables(config, model, jax.random.key(config.seed))
  return put_replicated(task.state_from_variables(config, variables), replicated_sharding())


def evaluate(config, model, variables, **kwargs) -> dict:
  return runtime.evaluate(_task(config), config, model, variables, **kwargs)


def open_checkpoints(config, workdir, **kwargs):
  task = _task(config)
  return ckpt_lib.Checkpoints(workdir, best_metric=task.BEST_METRIC, best_mode=task.BEST_MODE,
                              **kwargs)


def train_and_evaluate(config, workdir: str) -> dict:
  """Train with the task's schedule, evaluating and checkpointing; resumes from the workdir."""
  maybe_initialize_distributed(config)
  task = _task(config)
  model = build(config)
  prepare_dataset(config)
  steps_per_epoch = input_pipeline.num_examples(config, config.data.train_split) // \
      config.train.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} exceeds the '
                     f'{config.data.train_split!r} split of {config.data.name!r}')
  if config.train.batch_size % jax.device_count():
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'{jax.device_count()} devices')
  starts = task.stage_starts(config, steps_per_epoch)
  num_steps = task.total_steps(config, steps_per_epoch)
  eval_every = max(int(config.train.eval_every_epochs * steps_per_epoch), 1)

  template = template_state(config, model)  # shapes only: the state is made after the compile
  meta = ckpt_lib.model_meta(config, template.params)
  ckpts = open_checkpoints(config, workdir, keep=config.train.keep_checkpoints)
  ckpts.check_compatible(meta, workdir)  # before anything is written
  train_iter = input_pipeline.train_iterator(
      config, task.train_sample(config), seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  state = None
  if ckpts.all_steps():  # resume from the newest checkpoint that restores
    state, _ = ckpts.restore_first_intact(
        sorted(ckpts.all_steps(), reverse=True),
        ckpt_lib.abstract_like(template, replicated_sharding()), data_iterator=train_iter,
        set_aside=True)
  runner = Runner(config, model, starts)
  runner.compile(template, train_iter.peek())
  if state is None:
    state = initial_state(config, model)
  first_step = int(jax.device_get(state.step))
  state = runner.place_state(state)
  host_memory.release_start_up_memory()  # before the step's temporaries are first allocated
  reset_opt = jax.jit(lambda params: task.reset_optimizer(config, params),
                      out_shardings=replicated_sharding())
  eval_fn = task.make_eval_fn(config, model)
  if jax.process_index() == 0:  # the steps after the restored one are replayed: log them once
    log_lib.truncate_metrics(workdir, first_step)
  writer = log_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  progress = log_lib.ProgressBar(num_steps, initial=first_step,
                                 enabled=jax.process_index() == 0)
  guard = NonFiniteGuard(config, ckpts)
  preemption = Preemption(ckpts)
  pending = []  # device scalars since the last host sync
  results = {}
  window_start = [time.perf_counter()]  # time of the last sync (evaluations excluded)

  def sync(done):  # the loop's only host sync between evaluations
    if pending:
      summary = guard.check(jax.device_get(pending), done)
      # Wall time per step of this log window (the step is compiled before the loop).
      summary['time/step_seconds'] = (time.perf_counter() - window_start[0]) / len(pending)
      pending.clear()
      writer.write_scalars(done, summary)
      progress.set_postfix(loss=summary['loss/total'])
    window_start[0] = time.perf_counter()

  try:
    for step in range(first_step, num_steps):
      if preemption.reached(step):
        sync(step)
        if ckpts.latest_step() != step:
          ckpts.save(step, global_replicated(state), meta, data_iterator=train_iter)
        ckpts.wait()
        progress.write(f'preempted: saved step {step} in {ckpts.directory}; run the same '
                       f'command to resume')
        break
      if step in starts[1:-1]:  # a new stage: fresh optimiser state (official)
        state = state.replace(opt_state=reset_opt(global_replicated(state.params)))
      state, scalars = runner.step(state, next(train_iter))
      pending.append(scalars)
      done = step + 1
      progress.update(1)
      evaluate_now = done % eval_every == 0 or done == num_steps
      save_now = evaluate_now or done % config.train.checkpoint_every_steps == 0
      if done % config.train.log_every_steps == 0 or done == num_steps or save_now:
        sync(done)  # also before every save: no non-finite state is ever written
      if evaluate_now:
        results = runtime.evaluate(task, config, model, task.eval_variables(state),
                                   split=config.data.eval_split, step=done, workdir=workdir,
                                   writer=writer, eval_fn=eval_fn)
        progress.write(f'step {done}: {task.progress_line(results)}')
        ckpts.save(done, global_replicated(state), meta, data_iterator=train_iter,
                   metrics={task.BEST_METRIC: task.best_value(results)})
        window_start[0] = time.perf_counter()
      elif save_now:
        ckpts.save(done, global_replicated(state), meta, data_iterator=train_iter)
        window_start[0] = time.perf_counter()
  finally:
    preemption.close()
    progress.close()
    ckpts.close()
    writer.close()
  return results


class NonFiniteError(ValueError):
  """Training produced a non-finite loss or gradient (message names the steps and the last
  good checkpoint)."""


class NonFiniteGuard:
  """Reads the steps' 'finite' flags at each host sync: stops training with one line (default)
  or counts skipped updates (config.train.skip_nonfinite)."""

  def __init__(self, config, ckpts):
    self.skip = bool(config.train.get('skip_nonfinite', False))
    self.ckpts = ckpts
    self.skipped = 0

  def check(self, host_scalars: list, done: int) -> dict:
    finite = [bool(h.pop('finite', True)) for h in host_scalars]
    first = done - len(host_scalars) + 1
    if not all(finite):
      bad = [first + i for i, ok in enumerate(finite) if not ok]
      if not self.skip:
        last = self.ckpts.latest_step()
        where = (f'last good checkpoint: step {last} in {self.ckpts.directory}'
                 if last is not None else 'no checkpoint was saved')
        raise NonFiniteError(
            f'non-finite loss or gradients in steps {bad[0]}-{bad[-1]} (log window {first}-'
            f'{done}); training stopped, nothing non-finite was saved; {where} (lower the '
            f'learning rate, or set config.train.skip_nonfinite=True to skip such updates)')
      self.skipped += len(bad)
    summary = {k: float(np.mean([h[k] for h in host_scalars])) for k in host_scalars[0]}
    if self.skip:
      summary['train/skipped_steps'] = float(self.skipped)
    return summary


class Preemption:
  """SIGTERM (Slurm, TPU pods and most schedulers send it before stopping a job) asks the loop
  to save a checkpoint at the current step and stop. With several processes JAX's preemption
  service (jax.distributed) catches the signal and orbax's `reached_preemption` makes every
  process agree on the step; with one process a SIGTERM handler sets a flag."""

  def __init__(self, ckpts):
    import signal
    import threading
    self.ckpts = ckpts
    self.requested = False
    self.previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(self.ckpts.manager.reached_preemption(step))
    return self.requested

  def close(self):
    if self.previous is not None:
      import signal
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None


def template_state(config, model) -> TrainState:
  """Shapes and dtypes of a fresh TrainState (no initialiser runs)."""
  task = _task(config)
  # A second process of the same config and code reads it from the start-up cache, untraced.
  return compile_cache.cached_abstract(
      f'{task.__name__}.template_state', config, lambda: jax.eval_shape(
          lambda: task.state_from_variables(
              config, task.init_variables(config, model, jax.random.key(0)))))


def restore_state(config, workdir: str, model, checkpoint: str = '', *,
                  weights_only: bool = False) -> tuple[TrainState, int]:
  """(TrainState, step) from the workdir's best checkpoint, or `checkpoint` (a step number or a
  path to a step directory). weights_only: without the optimiser state (None), read as host
  arrays (`Checkpoints.restore_weights`)."""
  directory, step = workdir, None
  if checkpoint:
    if checkpoint.isdigit():
      step = int(checkpoint)
    else:
      path = os.path.abspath(checkpoint.rstrip('/'))
      directory, step = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
  ckpts = open_checkpoints(config, directory, read_only=True)
  if step is None:  # the best, else the newest that restores
    best = ckpts.best_step()
    steps = [] if best is None else [best] + [
        s for s in sorted(ckpts.all_steps(), reverse=True) if s != best]
  else:
    steps = [step]
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(directory, "checkpoints")!r}')
  template = template_state(config, model)
  ckpts.check_compatible(ckpt_lib.model_meta(config, template.params), directory)
  try:
    return ckpts.restore_first_intact(
        steps, ckpt_lib.abstract_like(template, replicated_sharding()),
        weights_only=weights_only)
  finally:
    ckpts.close()


def restore_variables(config, workdir: str, model, checkpoint: str = '') -> tuple[dict, int]:
  """(variables for evaluation and predict, replicated on every device, and step); see
  `restore_state`. The optimiser state is not read."""
  state, step = restore_state(config, workdir, model, checkpoint, weights_only=True)
  variables = _task(config).eval_variables(state)
  return put_replicated(variables, replicated_sharding()), step


def import_torch_checkpoint(config, paths, workdir: str) -> int:
  """Official PyTorch checkpoint file(s) -> an orbax checkpoint (step 0) in `workdir`, from which
  eval, predict and training (fresh optimiser state) start."""
  task = _task(config)
  model = build(config)
  paths = [paths] if isinstance(paths, str) else list(paths)
  variables = task.import_torch_variables(config, model, *paths)
  state = put_replicated(task.state_from_variables(config, variables), replicated_sharding())
  meta = ckpt_lib.model_meta(config, state.params)
  ckpts = open_checkpoints(config, workdir, keep=config.train.keep_checkpoints)
  ckpts.check_compatible(meta, workdir)
  if ckpts.latest_step() is not None:
    raise ValueError(f'workdir {workdir!r} already holds checkpoints; import into a new one')
  ckpts.save(0, state, dict(meta, imported_from=[os.path.abspath(p) for p in paths]))
  ckpts.close()
  return 0
