"""Tasks: what one application owns (model, loss and step, evaluation, previews).

The runner (cen_jax/train.py) and the evaluate loop (cen_jax/runtime.py) drive a task through the
same few module-level names, so the loop, checkpoints and main.py never ask which task they run:

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
  train_sample(config), eval_sample(config)     stored example -> example (the input pipeline's
                                                per-example functions; cen_jax/tasks/*_data.py)
  ONE_EVAL_SHAPE                                every eval example has one shape (no grouping)
  eval_variables(state)                         what evaluation/predict/export need
  make_eval_fn(config, model)                   runtime.local_eval_fn of the task's eval step
  Evaluation(config, eval_fn, *, split, workdir)  add(variables, index, batch) per batch (returns
                                                what the preview shows), results() after the last
  preview_image(config, batch, shown)           the preview PNG of the first batch
  evaluate(config, model, variables, ...)       runtime.evaluate with this task
  OUTPUT_KIND / output_kind(output)             an output's kind: its metrics (metrics.MAIN_METRICS)
  BEST_METRIC, BEST_MODE                        the checkpoint kept as 'best' ('max' | 'min')
  best_value(results), progress_line(results), RESULT_DIGITS
  named_norm_scales(params)                     [(block, [M, C] scale)] at the exchange point
  output_names(config)                          the outputs evaluated: branches + 'ensemble'
  batch_keys(config)                            (optional) host-batch keys when they depend on
                                                the config (dense: the tasks' targets)
"""

from cen_jax.tasks.by_name import TASKS, get

__all__ = ['TASKS', 'get']
