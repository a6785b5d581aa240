"""Keep freed host memory in the process between steps (glibc malloc on Linux).

By default glibc serves every large buffer with its own mmap and unmaps it when freed, so each
XLA:CPU step faults its working set in again page by page: 416,000 minor page faults and 0.6 s
of system time per ResNet-50 step at 128x128 (benchmarks/train_step.py). With mmap off, one
arena and no trimming, freed buffers are reused by the next step instead; the resident size
stays at its peak. Must run before JAX starts its threads (before the first computation, best
before `import jax`): arenas made earlier keep their settings.

Set CEN_JAX_KEEP_HOST_MEMORY=0 to leave the allocator as it is.
"""

import ctypes
import os
import sys

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_ARENA_MAX, 1))


def keep_freed_host_memory() -> bool:
  """Configure glibc malloc as above; False (and no change) off glibc or when disabled."""
  if os.environ.get('CEN_JAX_KEEP_HOST_MEMORY', '1') == '0' or not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # musl and other libcs: no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all([mallopt(param, value) == 1 for param, value in SETTINGS])
