"""Cycle multimodal fusion demo (TPAMI scenario, cen_jax/branches.py): three domains of the
embedded synthetic scenes, branch m reads domain m and predicts domain m + 1 mod 3:

  reshading -> edge_texture,  edge_texture -> rgb,  rgb -> reshading

Every branch alone faces an ill-posed mapping (shading has no colour stripes, edges have no
lighting, ...); channel exchange lets it draw on the other branches' features, one of which reads
its target domain. The translation demo's recipe (configs/demo_translation.py) at 2,000 steps:
the penalised scales cross the threshold after about 1,000 (the earlier 1,000-step demo never
exchanged a channel; docs/scenarios.md); compare
with `--config.model.fusion=none` (or `python -m cen_jax.ablate --config
configs/demo_translation_cycle.py --fusions cen,none`). Metric: L1 / RMSE of each branch against
its own target (there is no ensemble: the branches predict different domains).
"""

from cen_jax import branches
from cen_jax.configs import demo_translation

DOMAINS = ('reshading', 'edge_texture', 'rgb')


def get_config():
  config = demo_translation.get_config()
  config.modalities = DOMAINS
  config.branches = branches.cycle(DOMAINS)
  config.data.target = ''  # every branch has its own target
  config.train.num_epochs = 16  # 2,000 steps of batch 8
  return config
