"""A seconds-fast end-to-end config for the MiT: tiny_synthetic.py's data and schedule (a stage
boundary at step 4) with TokenFusion's segmenter at widths 8, 16, 20, 32, one block per stage,
no spatial reduction (the 16x20 scenes give 4x5 stage-1 maps), the AdamW recipe."""

from cen_jax.configs import demo_mit
from tests.helpers.configs import tiny_synthetic


def get_config():
  config = demo_mit.get_config('tokenfusion')
  base = tiny_synthetic.get_config()
  config.data = base.data
  for key in ('batch_size', 'stage_epochs', 'eval_every_epochs', 'log_every_steps',
              'checkpoint_every_steps', 'num_previews'):
    config.train[key] = base.train[key]
  m = config.model
  m.mit_embed_dims = (8, 16, 20, 32)
  m.mit_depths = (1, 1, 1, 1)
  m.mit_sr_ratios = (1, 1, 1, 1)
  m.embedding_dim = 8
  m.dropout = 0.5  # exercised: resumed runs must replay the same dropout masks
  config.train.warmup_steps = 2
  config.train.poly_steps = 4
  return config
