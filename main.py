"""cen-jax entry point: `python main.py --config configs/demo.py --workdir DIR [--mode MODE]`, the
same as the installed `cen-jax` command (cen_jax/cli.py has the modes and flags)."""

from cen_jax import cli  # first: it sets up host memory before JAX starts its threads

if __name__ == '__main__':
  cli.console()
