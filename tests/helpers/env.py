"""XLA flags of the test run, and the environment of the processes that tests start."""

import os

DEVICE_COUNT = '--xla_force_host_platform_device_count'
# Tests compile with LLVM's cheapest settings: the same programs, about half of XLA:CPU's compile
# time, which is most of the suite's time for the tiny models. Rounding may differ in the last
# bits, as between CPUs; every comparison in the suite runs both sides under the same flags.
# The demos and benchmarks compile as users do, and so do the tests marked `user_compile`
# (scripts/test.sh sets CEN_JAX_TEST_COMPILE=default for them): their bounds are the official
# float32's own rounding error, which a user's compile must meet (the two-GAN-step test missed its
# bound by 1% at -O0). A flag already in XLA_FLAGS wins.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')


def xla_flags(num_devices: int = 1) -> str:
  """XLA_FLAGS for `num_devices` CPU devices: the current flags (device count replaced) plus
  FAST_COMPILE (unless CEN_JAX_TEST_COMPILE=default)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT)]
  names = {f.split('=')[0] for f in flags}
  if os.environ.get('CEN_JAX_TEST_COMPILE') != 'default':
    flags += [f for f in FAST_COMPILE if f.split('=')[0] not in names]
  if num_devices > 1:
    flags.append(f'{DEVICE_COUNT}={num_devices}')
  return ' '.join(flags)


def child_env(num_devices: int = 1, drop: tuple = ()) -> dict:
  """os.environ for a process started by a test, with `num_devices` CPU devices."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env['XLA_FLAGS'] = xla_flags(num_devices)
  return env


def cache_from_every_process() -> None:
  """Lets every process of a multi-process run write JAX's persistent compilation cache.

  JAX writes it from process 0 only (jax/_src/compiler.py `_cache_write`), against write
  contention on shared filesystems. On XLA:CPU the other processes' cache keys differ from
  process 0's, so they compile everything again in every run, and the killed and resumed runs
  of one test compile the same programs. Each process writes its own keys here, to a local
  folder; a hit loads the executable that the same process compiled, so no figure changes."""
  from jax._src import compiler, distributed
  write = compiler._cache_write

  def write_as_process_0(*args, **kwargs):
    process_id = distributed.global_state.process_id
    distributed.global_state.process_id = 0
    try:
      return write(*args, **kwargs)
    finally:
      distributed.global_state.process_id = process_id

  compiler._cache_write = write_as_process_0
