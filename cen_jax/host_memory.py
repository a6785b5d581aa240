"""Keep freed host memory in the process between steps (glibc malloc on Linux).

By default glibc serves every large buffer with its own mmap and unmaps it when freed, so each
XLA:CPU step faults its working set in again page by page: 416,000 minor page faults and 0.6 s
of system time per ResNet-50 step at 128x128 (benchmarks/train_step.py). With mmap off, no
trimming and four arenas, freed buffers are reused by the next step instead; the resident size
stays at its peak. Call it first thing, before `import jax` (threads made earlier may already
have arenas of their own).

Set CEN_JAX_KEEP_HOST_MEMORY=0 to leave the allocator as it is.

A thread other than the main one gets an arena of its own, whose heaps are at most 64 MiB, and
glibc serves a larger request there with its own mmap, unmapped when freed, whatever the
settings above. With JAX's asynchronous dispatch, XLA:CPU runs a computation on such a worker
thread, so a step's temporaries were mapped and faulted in afresh every step: 525,000 page faults
and 0.85 s of system time per ResNet-50 step at 256x256 (2 GiB of temporaries), 153,000 and
0.25 s at 128x128. With config.train.cpu_async_dispatch = False, `use_async_cpu_dispatch_of`
makes XLA:CPU run single-device computations on the calling thread, whose arena is the main one
(the brk heap, grown as needed): 200 faults per step at either size. The host then no longer
prepares the next batch while a step runs, which costs small steps more than they gain
(config.train.cpu_async_dispatch). In some processes the heap grows once by a whole step's
temporaries, which then stay resident twice (docs/benchmarks.md, "Host memory": glibc's
memalign cannot reuse the freed block when it has not merged into the top of the heap);
train.Runner gives such a block back after each step (`release_freed_host_memory`).
"""

import ctypes
import functools
import os
import sys

# mallopt parameters (malloc.h); a trim threshold of -1 turns trimming off (mallopt(3)).
# Measured on the 2-core machine: without an arena limit the threads' own heaps are still
# unmapped when they empty (220,000 faults per 128x128 step); one arena removed the faults but
# made the demo's training loop 1.45x slower (6.7 against 9.7 steps/s); four arenas remove both
# (2,304 faults, 10.7 steps/s).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 4))


@functools.lru_cache(maxsize=None)
def _glibc_function(name: str, argtypes: tuple):
  """glibc's function `name`, typed, looked up once (malloc_trim runs after every step); None
  off Linux and on other libcs (musl: no mallopt)."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    function = getattr(ctypes.CDLL('libc.so.6'), name)
  except (OSError, AttributeError):
    return None
  function.argtypes, function.restype = argtypes, ctypes.c_int
  return function


def _glibc(name: str, argtypes: tuple):
  """`_glibc_function`, or None when CEN_JAX_KEEP_HOST_MEMORY=0."""
  if os.environ.get('CEN_JAX_KEEP_HOST_MEMORY', '1') == '0':
    return None
  return _glibc_function(name, argtypes)


def keep_freed_host_memory() -> bool:
  """Configure glibc malloc as above; False (and no change) off glibc or when disabled."""
  mallopt = _glibc('mallopt', (ctypes.c_int, ctypes.c_int))
  if mallopt is None:
    return False
  return all([mallopt(param, value) == 1 for param, value in SETTINGS])


def use_async_cpu_dispatch_of(config) -> None:
  """Whether XLA:CPU runs single-device computations on a worker thread (JAX's default) or on
  the calling thread (above): config.train.cpu_async_dispatch; a config without the key keeps
  JAX's setting. JAX reads it when it starts the CPU client: call it before the first
  computation; later calls change nothing in this process."""
  enabled = config.get('train', {}).get('cpu_async_dispatch')
  if enabled is not None:
    import jax  # pylint: disable=g-import-not-at-top: after keep_freed_host_memory
    jax.config.update('jax_cpu_enable_async_dispatch', bool(enabled))



def release_freed_host_memory(keep_top: int = 0) -> bool:
  """Give the pages of memory freed so far back to the system (glibc malloc_trim), all but
  `keep_top` bytes at the top of the heap. With trimming off (above) XLA's compile leaves about
  1 GiB of freed heap resident for the RefineNet-R50 step, and the step's temporaries, one
  block that does not fit in those fragments, come on top; after a step, a block stranded below
  the top of the heap (see the module docstring) is given back, while keep_top = the block's
  size keeps the one the next step reuses (docs/benchmarks.md, "Host memory"). False (and
  nothing done) off glibc or when CEN_JAX_KEEP_HOST_MEMORY=0."""
  trim = _glibc('malloc_trim', (ctypes.c_size_t,))
  if trim is None:
    return False
  trim(max(int(keep_top), 0))
  return True


def release_start_up_memory() -> bool:
  """Once the state and the compiled step exist, before the first step: drop JAX's in-memory
  caches of start-up programs (parameter init, shape tracing; the step is held compiled, and
  later programs compile or load as usual), collect, and `release_freed_host_memory`. About
  60 MiB of the R50 train step's resident memory, and what the compile left in the heap."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top: after keep_freed_host_memory
  jax.clear_caches()
  gc.collect()
  return release_freed_host_memory()
