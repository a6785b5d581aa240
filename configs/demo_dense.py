"""Demos of the TPAMI scenarios on the embedded synthetic scenes (cen_jax/tasks/dense.py):
`--config configs/demo_dense.py:<scenario>`, scenario one of SCENARIOS. Each is the CPU demo
(configs/demo.py: widths, 64x64 crops, 2,000 steps of batch 8, staged SGD, L1 5e-3) with the
branches of its scenario; compare with `--config.model.fusion=none` (or
`python -m cen_jax.ablate --config configs/demo_dense.py:<scenario> --fusions cen,none`).

The scenes store RGB, depth, the class mask, surface normals and a defocus image (RGB seen
with a shallow depth of field; data/synthetic_scenes). As an input, 'normals' is a third,
geometry-derived modality (the role HHA plays for NYUDv2); as a task it is predicted from the
inputs.
"""

from cen_jax import branches as branches_lib
from cen_jax import config as config_lib
from cen_jax.configs import demo

SCENARIOS = {
    # Multimodal fusion, M = 3: three inputs, one task.
    'fusion3': ('rgb>semseg', 'depth>semseg', 'normals>semseg'),
    # Multitask: one input, three task branches that exchange channels. The input is the
    # defocus image, whose blur tells depth (so it holds the depth-only classes too).
    'multitask': ('defocus>semseg', 'defocus>depth', 'defocus>normals'),
    # The same from rgb, which does not carry depth: capped near the rgb-only demo.
    'multitask_rgb': ('rgb>semseg', 'rgb>depth', 'rgb>normals'),
    # Multimodal multitask, M = 4: (rgb, depth) x (semseg, normals).
    'mm_multitask': ('rgb>semseg', 'depth>semseg', 'rgb>normals', 'depth>normals'),
}


def get_config(scenario='multitask'):
  if scenario not in SCENARIOS:
    raise ValueError(f'configs/demo_dense.py:{scenario}: expected one of {", ".join(SCENARIOS)}')
  config = config_lib.dense_config(SCENARIOS[scenario])
  base = demo.get_config()
  config.seed = base.seed
  for section in ('model', 'data', 'train'):
    for key, value in base[section].items():
      if not isinstance(value, type(base)):  # the demo's values; nested blocks stay default
        config[section][key] = value
  if any(b.task != 'semseg' for b in branches_lib.parse(SCENARIOS[scenario])):
    # With depth and normals heads, the demo's SGD diverged within 25 steps for two of three
    # seeds (multitask, cen and none alike); a clipped global norm keeps every seed finite.
    config.train.clip_grad_norm = 5.0
  return config
