"""Tasks: what one application owns (model, loss and step, evaluation, previews).

The shared runner (cen_jax/train.py) drives a task through the same few module-level functions,
so the loop, checkpoints and main.py never ask which task they run:

  check_config(config)                          one-line ValueError for a bad value
  build(config, *, axis_name)                   the model(s), collectives on `axis_name`
  init_variables(config, model, rng)            {'params', 'batch_stats'}, random init
  state_from_variables(config, variables)       TrainState with fresh optimiser state(s)
  initial_state_variables(config, model, rng)   init plus any pretrained weights (init_from)
  stage_starts(config, steps_per_epoch)         first step of every stage + the total; the
                                                optimiser state is reset at inner boundaries
  total_steps(config, steps_per_epoch)
  make_train_step(config, model, starts)        per-device (state, batch) -> (state, scalars)
  reset_optimizer(config, params)               fresh optimiser state(s) for a new stage
  BATCH_KEYS                                    host-batch keys besides the stacked inputs
  eval_variables(state)                         what evaluation/predict/export need
  make_eval_fn / evaluate(...)                  metrics over a split (eval_results.json)
  BEST_METRIC, BEST_MODE                        the checkpoint kept as 'best' ('max' | 'min')
  best_value(results), progress_line(results)
  named_norm_scales(params)                     [(block, [M, C] scale)] at the exchange point
  output_names(config)                          the outputs evaluated: branches + 'ensemble'
  batch_keys(config)                            (optional) host-batch keys when they depend on
                                                the config (dense: the tasks' targets)
"""

import importlib

TASKS = ('segmentation', 'translation', 'dense')


def get(config):
  """The task module named by `config.task` ('segmentation' when the config has no task key)."""
  name = config.get('task', 'segmentation')
  if name not in TASKS:
    raise ValueError(f'config.task={name!r}: expected one of {", ".join(TASKS)}')
  return importlib.import_module(f'cen_jax.tasks.{name}')
