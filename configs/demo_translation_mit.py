"""Translation demo on Mix Transformer branches: TokenFusion's generator and discriminator (a
narrow gen_b0 / dis_b0) on the embedded synthetic domains, CPU-sized: `--config
configs/demo_translation_mit.py:<fusion>`, fusion one of FUSIONS (default tokenfusion).

Data, crops, batch and budget of configs/demo_translation.py (shading + texture edges -> RGB,
64x64); the network is gen_b0 / dis_b0's depths (2 per stage) at widths 16, 32, 32, 64, 64;
the official TokenFusion recipe otherwise (Adam (0.5, 0.999), pixel L1 weight 100, stochastic
depth 0.1), with the demo's learning rates, unscaled by the batch, for training from scratch
in minutes. Not yet calibrated: no expected figures (`--mode check` has nothing to compare).
"""

from cen_jax.configs import demo_translation

FUSIONS = ('tokenfusion', 'cen', 'asymfusion', 'none')


def get_config(fusion: str = 'tokenfusion'):
  if fusion not in FUSIONS:
    raise ValueError(f'configs/demo_translation_mit.py:{fusion}: expected one of '
                     f'{", ".join(FUSIONS)}')
  config = demo_translation.get_config()
  config.expected = ()
  m = config.model
  m.backbone = 'mit_b0'
  m.mit_embed_dims = (16, 32, 32, 64, 64)  # heads 1, 2, 4, 8, 16
  m.fusion = fusion
  m.threshold = 0.02 if fusion == 'tokenfusion' else config.model.threshold
  t = config.train
  # tokenfusion: the official 1e-3. A step here scores 1,364 tokens per image and branch, batch
  # 8 (~1e4 in all at scores near 0.5), the official 256x256 batch of one 21,824 per branch:
  # the same order of penalty. cen: the CEN demo's weight on the norm2 scales.
  t.l1_lambda = {'tokenfusion': 1e-3, 'cen': config.train.l1_lambda}.get(fusion, 0.0)
  return config
