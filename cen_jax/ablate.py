"""Compare fusions on one budget: `python -m cen_jax.ablate --config configs/demo.py
--fusions cen,none,separate,early,random_exchange --seeds 3 --workdir workdirs/ablate_demo`.

Each (fusion, seed) trains in `<workdir>/<fusion>/seed<k>` with the config's schedule
(config.seed + k; every other key as given, overrides like main.py's `--config.x=y` apply to
all runs); a finished run is not trained again, so an interrupted ablation resumes. Then
`<workdir>/ablation.md` gets a Markdown table (mean ± std over seeds of each output's metrics
from eval_results.json, parameters, median step time) and `<workdir>/ablation.png` a plot of
every output's main metric per fusion.
"""

import json
import os
import sys

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Where the runs, ablation.md and ablation.png go.')
flags.DEFINE_list('fusions', ['cen', 'none'], 'Registered fusions to compare.')
flags.DEFINE_integer('seeds', 1, 'Runs per fusion (config.seed + 0, 1, ...).')

MAIN_METRIC = {'segmentation': ('miou', 'mIoU', 'higher'),
               'translation': ('l1', 'L1', 'lower')}
TABLE_METRICS = {'segmentation': ('miou',), 'translation': ('l1', 'rmse', 'fid', 'kid')}


class Interrupted(Exception):
  """A run stopped before its last step (SIGTERM): its checkpoint resumes it next time."""


def run_config(config, fusion: str, seed: int):
  config = config.copy_and_resolve_references()
  config.model.fusion = fusion
  config.seed = int(config.seed) + seed  # l1_lambda weighs only fusions with a penalty
  return config


def finished(workdir: str, num_steps: int) -> bool:
  path = os.path.join(workdir, 'eval_results.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get('step') == num_steps


def median_step_seconds(workdir: str) -> float:
  """Median of the logged per-step wall times, the first window (compilation) left out."""
  times = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'time/step_seconds' in record:
        times.append(record['time/step_seconds'])
  return float(np.median(times[1:] if len(times) > 1 else times)) if times else float('nan')


def param_count(config) -> int:
  import jax
  from cen_jax import models, train
  model = train.build(config)
  task = train._task(config)
  shapes = jax.eval_shape(lambda: task.init_variables(config, model, jax.random.key(0)))
  return models.count_params(shapes['params'])


def output_order(rows: list, branches) -> list[str]:
  """The outputs of every run: the config's branches in order, any other, then 'ensemble'."""
  seen = [o for _, _, _, results in rows for r in results for o in r['metrics']]
  others = sorted(set(seen) - set(branches) - {'ensemble'})
  return [b for b in branches if b in seen] + others + ['ensemble']


def summarise(rows: list, task: str, outputs: list) -> list[str]:
  """rows: (fusion, params, step seconds, [results of each seed]) -> Markdown lines."""
  metrics = [m for m in TABLE_METRICS[task] if m in rows[0][3][0]['metrics']['ensemble']]
  header = ['fusion', 'seeds'] + [f'{o} {m}' for o in outputs for m in metrics] + [
      'params', 'step (s)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  digits = 2 if task == 'segmentation' else 4
  for fusion, params, seconds, results in rows:
    cells = [f'`{fusion}`', str(len(results))]
    for o in outputs:
      for m in metrics:
        values = [r['metrics'].get(o, {}).get(m) for r in results]
        values = np.asarray([v for v in values if v is not None], np.float64)
        cells.append('–' if not values.size else
                     f'{values.mean():.{digits}f} ± {values.std():.{digits}f}')
    cells += [f'{params:,}', f'{seconds:.3f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def plot(rows: list, task: str, outputs: list, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from cen_jax import viz
  key, label, better = MAIN_METRIC[task]
  fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
  width = 0.8 / len(outputs)
  for k, output in enumerate(outputs):
    means, stds, xs = [], [], []
    for i, (_, _, _, results) in enumerate(rows):
      values = [r['metrics'][output][key] for r in results if output in r['metrics']]
      if values:
        xs.append(i + k * width)
        means.append(np.mean(values))
        stds.append(np.std(values))
    ax.bar(xs, means, width, yerr=stds, capsize=3, label=output)
  ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
  ax.set_xticklabels([r[0] for r in rows])
  ax.set(ylabel=f'{label} ({better} is better)', title='fusions on one budget (mean ± std)')
  ax.legend(fontsize=7)
  viz.save_figure(path, fig)


def ablate(config, workdir: str, fusion_names, seeds: int) -> list[str]:
  from cen_jax import fusions, input_pipeline, train
  from cen_jax.logging import write_json_atomic
  fusions.load_user_module(config.model.get('fusion_module', ''))
  for name in fusion_names:
    fusions.get(name)  # every name checked before anything trains
  task_name = config.get('task', 'segmentation')
  rows = []
  for name in fusion_names:
    results, seconds = [], []
    for seed in range(seeds):
      cfg = run_config(config, name, seed)
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      steps_per_epoch = input_pipeline.num_examples(cfg, cfg.data.train_split) // \
          cfg.train.batch_size
      num_steps = train._task(cfg).total_steps(cfg, steps_per_epoch)
      if not finished(run_dir, num_steps):
        print(f'ablate: training {name} seed {seed} in {run_dir}', flush=True)
        train.train_and_evaluate(cfg, run_dir)
        if not finished(run_dir, num_steps):
          raise Interrupted(f'ablate: {name} seed {seed} stopped before step {num_steps}; run '
                            f'the same command to resume')
      with open(os.path.join(run_dir, 'eval_results.json')) as f:
        results.append(json.load(f))
      seconds.append(median_step_seconds(run_dir))
    rows.append((name, param_count(run_config(config, name, 0)), float(np.median(seconds)),
                 results))
  outputs = output_order(rows, list(config.modalities))
  lines = summarise(rows, task_name, outputs)
  steps = rows[0][3][0]['step']
  caption = (f'{len(fusion_names)} fusions x {seeds} seeds, {steps} steps each, '
             f'split {rows[0][3][0]["split"]!r}; step time: median wall seconds per training '
             f'step (compilation excluded)')
  with open(os.path.join(workdir, 'ablation.md.tmp'), 'w') as f:
    f.write('\n'.join(lines + ['', caption, '']))
  os.replace(os.path.join(workdir, 'ablation.md.tmp'), os.path.join(workdir, 'ablation.md'))
  write_json_atomic(os.path.join(workdir, 'ablation.json'),
                    [{'fusion': r[0], 'params': r[1], 'step_seconds': r[2], 'results': r[3]}
                     for r in rows])
  plot(rows, task_name, outputs, os.path.join(workdir, 'ablation.png'))
  return lines + ['', caption]


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None or not FLAGS.workdir:
    sys.exit('error: --config and --workdir are required')
  import warnings
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  warnings.filterwarnings('ignore')
  try:
    lines = ablate(FLAGS.config, FLAGS.workdir, FLAGS.fusions, FLAGS.seeds)
  except Interrupted as e:
    print(e)
    return
  except ValueError as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
