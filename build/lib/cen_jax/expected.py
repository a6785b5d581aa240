"""Whether a finished run's figures fall where the config says they should (`--mode check`).

A config lists `config.expected`: (output, metric, mean, std) of the final evaluation over
several seeds on a reference machine (the demo configs; docs/demo.md says how they were
measured). A figure is inside when it is within `SPREAD` standard deviations of the mean, or
within `floor` of it where the seeds happened to agree more closely than CPUs do.
"""

import json
import os

SPREAD = 3.0


def band(mean: float, std: float, floor: float) -> tuple[float, float]:
  half = max(SPREAD * std, floor)
  return mean - half, mean + half


def compare(results: dict, expected, *, floor: float) -> list[dict]:
  """One row per expected figure: output, metric, value, mean, std, low, high, inside."""
  rows = []
  for output, metric, mean, std in expected:
    scores = results['metrics'].get(output, {})
    if metric not in scores:
      raise ValueError(f'eval_results.json has no {output}/{metric} (has '
                       f'{", ".join(f"{o}/{m}" for o, s in results["metrics"].items() for m in s)})')
    low, high = band(mean, std, floor)
    value = float(scores[metric])
    rows.append(dict(output=output, metric=metric, value=value, mean=mean, std=std, low=low,
                     high=high, inside=low <= value <= high))
  return rows


def check_workdir(config, workdir: str, *, num_steps: int, digits: int) -> tuple[list, bool]:
  """(lines to print, all inside) for <workdir>/eval_results.json against config.expected."""
  expected = tuple(config.get('expected', ()))
  if not expected:
    return ['this config lists no expected figures (config.expected)'], True
  path = os.path.join(workdir, 'eval_results.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not found; train the config first')
  with open(path) as f:
    results = json.load(f)
  if results.get('step') != num_steps:
    raise ValueError(f'{path}: evaluated at step {results.get("step")}, but the expected figures '
                     f'are for the end of training (step {num_steps}); train to the end first')
  floor = 0.5 * 10.0 ** -(digits - 2)  # e.g. 0.5 mIoU points, 0.005 of an L1 error
  rows = compare(results, expected, floor=floor)
  lines = [f'{r["output"]:>12} {r["metric"]:<6} {r["value"]:.{digits}f}  expected '
           f'{r["mean"]:.{digits}f} ± {r["std"]:.{digits}f}, range [{r["low"]:.{digits}f}, '
           f'{r["high"]:.{digits}f}]: {"inside" if r["inside"] else "OUTSIDE"}' for r in rows]
  inside = all(r['inside'] for r in rows)
  lines.append('all figures inside the expected range' if inside else
               'some figures are outside the expected range: see docs/demo.md for what moves them')
  return lines, inside
