"""Compare fusions on one budget: `python -m cen_jax.ablate --config configs/demo.py
--fusions cen,none,separate,early,random_exchange --seeds 3 --workdir workdirs/ablate_demo`.

Each (fusion, seed) trains in `<workdir>/<fusion>/seed<k>` with the config's schedule
(config.seed + k; every other key as given, overrides like main.py's `--config.x=y` apply to
all runs); a finished run is not trained again, so an interrupted ablation resumes. Then
`<workdir>/ablation.md` gets a Markdown table (mean ± std over seeds of each output's metrics
from eval_results.json, parameters, median step time) and `<workdir>/ablation.png` a plot of
every output's main metric per fusion.

`--combine LABEL=DIR,...` trains nothing: it tabulates and plots finished ablations together, as
`<fusion> (<LABEL>)` rows (fusions each trained with their own recipe, or on other backbones).
"""

import json
import os
import sys

from cen_jax import compile_cache
from cen_jax import host_memory

if __name__ == '__main__':
  host_memory.keep_freed_host_memory()  # as main.py does, before JAX starts its threads

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from cen_jax import metrics as metrics_lib
from cen_jax import run_log as log_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Where the runs, ablation.md and ablation.png go.')
flags.DEFINE_list('fusions', ['cen', 'none'], 'Registered fusions to compare.')
flags.DEFINE_integer('seeds', 1, 'Runs per fusion (config.seed + 0, 1, ...).')
flags.DEFINE_list('combine', [], 'Instead of training: LABEL=DIR of finished ablations, '
                  'tabulated and plotted together in --workdir as "<fusion> (<LABEL>)" rows.')

class Interrupted(Exception):
  """A run stopped before its last step (SIGTERM): its checkpoint resumes it next time."""


def run_config(config, fusion: str, seed: int):
  config = config.copy_and_resolve_references()
  config.model.fusion = fusion
  config.seed = int(config.seed) + seed  # l1_lambda weighs only fusions with a penalty
  return config


DIVERGED_FILE = 'diverged.json'  # a run stopped by a non-finite loss: reported, not retried


def diverged(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, DIVERGED_FILE))


def finished(workdir: str, num_steps: int) -> bool:
  path = os.path.join(workdir, 'eval_results.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get('step') == num_steps


def median_step_seconds(workdir: str) -> float:
  """Median of the logged per-step wall times, the first window (compilation) left out."""
  times = [record['time/step_seconds'] for record in log_lib.read_metrics(workdir)
           if 'time/step_seconds' in record]
  return float(np.median(times[1:] if len(times) > 1 else times)) if times else float('nan')


def param_count(config) -> int:
  import jax
  from cen_jax import models, tasks, train
  model = train.build(config)
  task = tasks.get(config)
  shapes = jax.eval_shape(lambda: task.init_variables(config, model, jax.random.key(0)))
  return models.count_params(shapes['params'])


def output_order(rows: list, preferred) -> list[str]:
  """The outputs of every run: the config's outputs in order, any other, then 'ensemble'."""
  seen = [o for row in rows for r in row[3] for o in r['metrics']]
  others = sorted(set(seen) - set(preferred) - {'ensemble'})
  last = ['ensemble'] if 'ensemble' in seen else []
  return [b for b in preferred if b in seen and b != 'ensemble'] + others + last


def table_columns(rows: list, task, outputs: list) -> list[tuple]:
  """(output, metric) of every column: each output's table metrics that some run reports."""
  reported = {(o, m) for row in rows for r in row[3]
              for o, scores in r['metrics'].items() for m in scores}
  return [(o, m) for o in outputs for m in metrics_lib.TABLE_METRICS[task.output_kind(o)]
          if (o, m) in reported]


def summarise(rows: list, task, outputs: list) -> list[str]:
  """rows: (fusion, params, step seconds, [results of each finished seed], diverged seeds)
  -> Markdown lines."""
  columns = table_columns(rows, task, outputs)
  header = ['fusion', 'seeds'] + [f'{o} {m}' for o, m in columns] + ['params', 'step (s)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  digits = task.RESULT_DIGITS
  for fusion, params, seconds, results, num_diverged in rows:
    cells = [f'`{fusion}`', str(len(results)) + (f' (+{num_diverged} diverged)'
                                                 if num_diverged else '')]
    for o, m in columns:
      values = [r['metrics'].get(o, {}).get(m) for r in results]
      values = np.asarray([v for v in values if v is not None], np.float64)
      cells.append('–' if not values.size else
                   f'{values.mean():.{digits}f} ± {values.std():.{digits}f}')
    cells += [f'{params:,}', f'{seconds:.3f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def plot(rows: list, task, outputs: list, path: str) -> None:
  """Bars of every output's main metric per fusion; one panel per metric (dense: per task)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from cen_jax import viz
  panels: dict = {}
  for output in outputs:
    panels.setdefault(metrics_lib.MAIN_METRICS[task.output_kind(output)], []).append(output)
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=(len(panels) * (1.6 * len(rows) + 2), 3.5))
  for ax, ((key, label, better), members) in zip(axes[0], panels.items()):
    width = 0.8 / len(members)
    for k, output in enumerate(members):
      means, stds, xs = [], [], []
      for i, row in enumerate(rows):
        results = row[3]
        values = [r['metrics'][output][key] for r in results if output in r['metrics']]
        if values:
          xs.append(i + k * width)
          means.append(np.mean(values))
          stds.append(np.std(values))
      ax.bar(xs, means, width, yerr=stds, capsize=3, label=output)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
    long = max(len(r[0]) for r in rows) > 12
    ax.set_xticklabels([r[0] for r in rows], rotation=25 if long else 0,
                       ha='right' if long else 'center')
    ax.set(ylabel=f'{label} ({"higher" if better else "lower"} is better)',
           title='fusions on one budget (mean ± std)')
    ax.legend(fontsize=7)
  viz.save_figure(path, fig)


def ablate(config, workdir: str, fusion_names, seeds: int) -> list[str]:
  from cen_jax import input_pipeline, tasks, train
  from cen_jax.fusion import registry
  registry.load_user_module(config.model.get('fusion_module', ''))
  for name in fusion_names:
    registry.get(name)  # every name checked before anything trains
  task = tasks.get(config)
  rows = []
  for name in fusion_names:
    results, seconds, num_diverged = [], [], 0
    for seed in range(seeds):
      cfg = run_config(config, name, seed)
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      steps_per_epoch = input_pipeline.num_examples(cfg, cfg.data.train_split) // \
          cfg.train.batch_size
      num_steps = task.total_steps(cfg, steps_per_epoch)
      if not finished(run_dir, num_steps) and not diverged(run_dir):
        print(f'ablate: training {name} seed {seed} in {run_dir}', flush=True)
        try:
          train.train_and_evaluate(cfg, run_dir)
        except train.NonFiniteError as e:  # a result of the fusion: recorded in the table
          print(f'ablate: {name} seed {seed} diverged: {e}', flush=True)
          log_lib.write_json_atomic(os.path.join(run_dir, DIVERGED_FILE), {'error': str(e)})
      if diverged(run_dir):
        num_diverged += 1
        continue
      if not finished(run_dir, num_steps):
          raise Interrupted(f'ablate: {name} seed {seed} stopped before step {num_steps}; run '
                            f'the same command to resume')
      with open(os.path.join(run_dir, 'eval_results.json')) as f:
        results.append(json.load(f))
      seconds.append(median_step_seconds(run_dir))
    rows.append((name, param_count(run_config(config, name, 0)),
                  float(np.median(seconds)) if seconds else float('nan'), results, num_diverged))
  return report(rows, task, config, workdir, f'{len(fusion_names)} fusions x {seeds} seeds')


def combine(config, workdir: str, pairs) -> list[str]:
  """One table and plot from finished ablations (`LABEL=DIR`, each DIR an ablation's workdir),
  e.g. each fusion trained with its own recipe: rows are `<fusion> (<LABEL>)`."""
  from cen_jax import tasks
  rows = []
  for pair in pairs:
    label, sep, folder = pair.partition('=')
    if not sep or not label or not folder:
      raise ValueError(f'--combine: expected LABEL=DIR, got {pair!r}')
    path = os.path.join(folder, 'ablation.json')
    if not os.path.exists(path):
      raise ValueError(f'--combine: {path} not found (run that ablation first)')
    with open(path) as f:
      rows += [(f'{r["fusion"]} ({label})', r['params'], r['step_seconds'], r['results'],
                r['diverged']) for r in json.load(f)]
  os.makedirs(workdir, exist_ok=True)
  return report(rows, tasks.get(config), config, workdir, f'{len(rows)} rows of '
                f'{len(pairs)} ablations')


def report(rows: list, task, config, workdir: str, what: str) -> list[str]:
  """Writes ablation.md, ablation.json and ablation.png of `rows` in `workdir`."""
  outputs = output_order(rows, task.output_names(config))
  lines = summarise(rows, task, outputs)
  first = next((r[3][0] for r in rows if r[3]), None)
  if first is None:
    raise ValueError(f'every run in {workdir} diverged: nothing to tabulate')
  caption = (f'{what}, {first["step"]} steps each, '
             f'split {first["split"]!r}; mean ± std over the seeds that finished (seeds: '
             f'finished, and how many stopped at a non-finite loss); step time: median wall '
             f'seconds per training step (compilation excluded)')
  with open(os.path.join(workdir, 'ablation.md.tmp'), 'w') as f:
    f.write('\n'.join(lines + ['', caption, '']))
  os.replace(os.path.join(workdir, 'ablation.md.tmp'), os.path.join(workdir, 'ablation.md'))
  log_lib.write_json_atomic(os.path.join(workdir, 'ablation.json'),
                    [{'fusion': r[0], 'params': r[1], 'step_seconds': r[2], 'results': r[3],
                      'diverged': r[4]} for r in rows])
  plot(rows, task, outputs, os.path.join(workdir, 'ablation.png'))
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
  host_memory.use_async_cpu_dispatch_of(FLAGS.config)  # as main.py does
  compile_cache.use_compile_cache(FLAGS.config)
  try:
    lines = combine(FLAGS.config, FLAGS.workdir, FLAGS.combine) if FLAGS.combine else \
        ablate(FLAGS.config, FLAGS.workdir, FLAGS.fusions, FLAGS.seeds)
  except Interrupted as e:
    print(e)
    return
  except ValueError as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
