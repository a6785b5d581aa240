"""cen-jax entry point: `python main.py --config configs/demo.py --workdir DIR [--mode MODE]`.

Modes: train (default; resumes from the workdir), eval (best checkpoint or --checkpoint),
predict (--inputs one file or folder per modality, --output DIR), summary (parameter count and
forward GFLOPs, no data), prepare (build the configured dataset), import (--torch_checkpoint,
an official CEN/AsymFusion .pth, into an orbax checkpoint in --workdir), export (the workdir's
checkpoint to an official-style PyTorch state_dict at --output).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ('train', 'eval', 'predict', 'summary', 'prepare', 'import', 'export')

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
flags.DEFINE_string('torch_checkpoint', '', 'import: official CEN/AsymFusion checkpoint.')


def fail(message: str) -> None:
  message = ' '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing that reports a bad flag or config override in one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown override key as AttributeError/KeyError.
    message = str(e).replace('\\n', ' ').replace("\\'", "'")
    if len(message) > 1 and message[0] == message[-1] and message[0] in '"\'':
      message = message[1:-1]
    fail(f'bad command line: {message}' if isinstance(e, flags.Error) else
         f'unknown config key {message}')


def summary(config) -> None:
  import jax
  import jax.numpy as jnp
  from cen_jax import models
  model = models.build_model(config)
  size = config.data.crop_size
  x = jax.ShapeDtypeStruct((len(config.modalities), 1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x,
                                                  train=False), x)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = forward.lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  print(f'model: {config.model.fusion} resnet blocks {models.config_lib.resnet_blocks(config.model)}'
        f', modalities {list(config.modalities)}, {config.model.num_classes} classes, '
        f'input {size}x{size}')
  print(f'params: {models.count_params(variables["params"])}')
  print(f'gflops: {cost["flops"] / 1e9:.2f}')


def run(config, workdir: str) -> None:
  mode = FLAGS.mode
  if mode not in MODES:
    fail(f'unknown --mode={mode!r}; expected one of {", ".join(MODES)}')
  if mode == 'summary':
    return summary(config)
  if mode == 'prepare':
    from cen_jax import input_pipeline
    input_pipeline.prepare(config)
    print(f'prepared {config.data.name!r} in {config.data.data_dir}')
    return
  if not workdir:
    fail(f'--workdir is required for --mode={mode}')
  from cen_jax import train
  if mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode == 'eval':
    model = train.build(config)
    variables, step = train.restore_variables(config, workdir, model, FLAGS.checkpoint)
    results = train.evaluate(config, model, variables, split=config.data.eval_split,
                             step=step, workdir=workdir)
    for name, scores in results['metrics'].items():
      print(f'{name:>10}: ' + '  '.join(f'{k} {v:.2f}' for k, v in scores.items()))
  elif mode == 'predict':
    from cen_jax import predict
    if len(FLAGS.inputs) != len(config.modalities) or not FLAGS.output:
      fail(f'--mode=predict needs --inputs once per modality {list(config.modalities)} '
           f'and --output')
    model = train.build(config)
    variables, _ = train.restore_variables(config, workdir, model, FLAGS.checkpoint)
    if all(os.path.isdir(p) for p in FLAGS.inputs):
      predict.predict_folder(config, variables, FLAGS.inputs, FLAGS.output,
                             save_logits=FLAGS.save_logits)
    else:
      predict.predict_files(config, variables, FLAGS.inputs, FLAGS.output,
                            save_logits=FLAGS.save_logits)
  elif mode == 'import':
    if not FLAGS.torch_checkpoint:
      fail('--mode=import needs --torch_checkpoint FILE')
    step = train.import_torch_checkpoint(config, FLAGS.torch_checkpoint, workdir)
    print(f'imported {FLAGS.torch_checkpoint} as step {step} in {workdir}')
  elif mode == 'export':
    from cen_jax import torch_io
    if not FLAGS.output:
      fail('--mode=export needs --output FILE.pth')
    model = train.build(config)
    variables, _ = train.restore_variables(config, workdir, model, FLAGS.checkpoint)
    torch_io.save_torch_checkpoint(FLAGS.output, variables)
    print(f'exported to {FLAGS.output}')


def main(argv):
  if not FLAGS['verbosity'].present:  # TFDS and orbax log every step at INFO; -v 0 shows it
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    fail('--config is required (e.g. --config configs/demo.py)')
  try:
    run(FLAGS.config, FLAGS.workdir)
  except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
    fail(str(e) or type(e).__name__)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
