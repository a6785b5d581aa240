"""The command line: `cen-jax --config configs/demo.py --workdir DIR [--mode MODE]` (the same as
`python main.py ...` in a checkout).

Modes: train (default; resumes from the workdir), eval (best checkpoint or --checkpoint),
predict (--inputs one file or folder per modality, --output DIR), summary (parameter count and
forward GFLOPs, no data), prepare (build the configured dataset), import (--torch_checkpoint,
official PyTorch checkpoint file(s), into an orbax checkpoint in --workdir), export (the
workdir's checkpoint to official-style PyTorch state_dict(s) at --output), fid (FID/KID between
two image folders given as --inputs, with config.eval.inception_weights), scales (the norm
scales under the exchange threshold over training and per layer, and their histograms:
<workdir>/norm_scales.png), check (whether the workdir's final eval_results.json falls in the
range the config expects, `config.expected`; exit status 1 when it does not).

`config.task` picks the task (cen_jax/tasks/): 'segmentation' or 'translation'.
"""

import os
import sys
import warnings

from cen_jax import compile_cache
from cen_jax import host_memory

host_memory.keep_freed_host_memory()  # before JAX starts its threads

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ('train', 'eval', 'predict', 'summary', 'prepare', 'import', 'export', 'fid', 'scales',
         'check')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs, eval_results.json, previews.')
flags.DEFINE_string('mode', 'train', f'One of {", ".join(MODES)}.')
flags.DEFINE_string('checkpoint', '', 'eval/predict/export: a step number or step directory '
                    '(default: the best checkpoint).')
flags.DEFINE_multi_string('inputs', [], 'predict: one image (or folder) per modality, in the '
                          "config's modality order.")
flags.DEFINE_string('output', '', 'predict: output folder; export: the .pth file to write.')
flags.DEFINE_bool('save_logits', False, 'predict: also write raw logits as .npy.')
flags.DEFINE_multi_string('torch_checkpoint', [], 'import: the official checkpoint (segmentation: '
                          'the CEN/AsymFusion .pth; translation: checkpoint-gen.pkl, optionally '
                          'followed by checkpoint-dis.pkl).')


def fail(message: str) -> None:
  message = ' '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def fid_default_config() -> str:
  import importlib.util
  return importlib.util.find_spec('cen_jax.configs.fid').origin  # configs/fid.py


def with_fid_default_config(argv: list) -> list:
  """--mode=fid reads only config.eval: without --config it takes configs/fid.py, so
  `--config.eval.inception_weights=FILE` alone works."""
  args = argv[1:]
  fid_mode = '--mode=fid' in args or any(a == '--mode' and b == 'fid'
                                         for a, b in zip(args, args[1:]))
  has_config = any(a == '--config' or a.startswith('--config=') for a in args)
  return [argv[0], f'--config={fid_default_config()}', *args] if fid_mode and not has_config \
      else argv


def parse_flags(argv):
  """absl flag parsing that reports a bad flag or config override in one line."""
  try:
    return FLAGS(with_fid_default_config(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown override key as AttributeError/KeyError.
    message = str(e).replace('\\n', ' ').replace("\\'", "'")
    if len(message) > 1 and message[0] == message[-1] and message[0] in '"\'':
      message = message[1:-1]
    fail(f'bad command line: {message}' if isinstance(e, flags.Error) else
         f'unknown config key {message}')


def run_mode(config, workdir: str) -> None:
  mode = FLAGS.mode
  if mode not in MODES:
    fail(f'unknown --mode={mode!r}; expected one of {", ".join(MODES)}')
  from cen_jax import tasks, train
  task = tasks.get(config)
  train.check_config(config)
  # Several processes (config.distributed): before any JAX computation.
  train.maybe_initialize_distributed(config)
  if mode == 'summary':
    for line in task.summary(config):
      print(line)
    return
  if mode == 'prepare':
    train.prepare_dataset(config)  # process 0 writes, the others wait
    print(f'prepared {config.data.name!r} in {config.data.data_dir}')
    return
  if mode == 'fid':
    from cen_jax import fid
    if len(FLAGS.inputs) != 2:
      fail('--mode=fid needs --inputs DIR_A --inputs DIR_B')
    scores = fid.compare_folders(FLAGS.inputs[0], FLAGS.inputs[1],
                                 config.eval.inception_weights)
    for key, value in scores.items():
      print(f'{key}: {value:.4f}')
    return
  if not workdir:
    fail(f'--workdir is required for --mode={mode}')
  if mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode == 'eval':
    model = train.build(config)
    train.prepare_dataset(config)
    variables, step = train.restore_variables(config, workdir, model, FLAGS.checkpoint)
    results = train.evaluate(config, model, variables, split=config.data.eval_split,
                             step=step, workdir=workdir, progress=True)
    import jax
    for name, scores in results['metrics'].items() if jax.process_index() == 0 else ():
      print(f'{name:>10}: ' + '  '.join(f'{k} {v:.{task.RESULT_DIGITS}f}'
                                         for k, v in scores.items()))
  elif mode == 'predict':
    if len(FLAGS.inputs) != len(config.modalities) or not FLAGS.output:
      fail(f'--mode=predict needs --inputs once per modality {list(config.modalities)} '
           f'and --output')
    model = train.build(config)
    variables, _ = train.restore_variables(config, workdir, model, FLAGS.checkpoint)
    task.predict(config, model, variables, FLAGS.inputs, FLAGS.output,
                 save_logits=FLAGS.save_logits)
  elif mode == 'import':
    if not FLAGS.torch_checkpoint:
      fail('--mode=import needs --torch_checkpoint FILE')
    step = train.import_torch_checkpoint(config, FLAGS.torch_checkpoint, workdir)
    print(f'imported {", ".join(FLAGS.torch_checkpoint)} as step {step} in {workdir}')
  elif mode == 'scales':
    from cen_jax import analysis, models
    model = train.build(config)
    state, step = train.restore_state(config, workdir, model, FLAGS.checkpoint)
    path = FLAGS.output or os.path.join(workdir, 'norm_scales.png')
    branches = models.branch_names(config)
    names, fractions = analysis.scale_figure(
        task.named_norm_scales(state.params), branches, config.model.threshold,
        analysis.logged_fractions(workdir, branches), step, path)
    print(f'{"layer":>12}  ' + '  '.join(f'{b:>12}' for b in branches))
    for name, row in zip(names, fractions):
      print(f'{name:>12}  ' + '  '.join(f'{v:12.3f}' for v in row))
    print(f'fraction of penalised scales under {config.model.threshold} at step {step}; '
          f'figure: {path}')
  elif mode == 'check':
    from cen_jax import expected, input_pipeline
    steps_per_epoch = (input_pipeline.num_examples(config, config.data.train_split) //
                       config.train.batch_size)
    lines, inside = expected.check_workdir(
        config, workdir, num_steps=task.total_steps(config, steps_per_epoch),
        digits=task.RESULT_DIGITS)
    print('\n'.join(lines))
    if not inside:
      sys.exit(1)
  elif mode == 'export':
    if not FLAGS.output:
      fail('--mode=export needs --output PATH')
    model = train.build(config)
    state, _ = train.restore_state(config, workdir, model, FLAGS.checkpoint)
    for path in task.export_torch(state, FLAGS.output):
      print(f'exported to {path}')


def main(argv):
  if not FLAGS['verbosity'].present:
    # Third-party logs and warnings a user cannot act on (TFDS and orbax log every step at
    # INFO, orbax warns about read-only managers) are hidden; --verbosity 0 shows them.
    logging.set_verbosity(logging.ERROR)
    warnings.filterwarnings('ignore')
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    fail('--config is required (e.g. --config configs/demo.py)')
  host_memory.use_async_cpu_dispatch_of(FLAGS.config)  # before the first computation
  compile_cache.use_compile_cache(FLAGS.config)
  try:
    run_mode(FLAGS.config, FLAGS.workdir)
  except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
    fail(str(e) or type(e).__name__)


def console() -> None:
  """The `cen-jax` console command and main.py."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  console()
