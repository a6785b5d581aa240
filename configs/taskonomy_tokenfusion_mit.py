"""TokenFusion translation, Taskonomy shade (reshading) + texture edges -> RGB: the official
recipe (yikaiw/TokenFusion image2image_translation/main.py), `--config
configs/taskonomy_tokenfusion_mit.py:<arch>`, arch b0..b5 (default b2, the official's).

Mix Transformer generator gen_bX (five stride-2 stages, shared Linear/Conv, private
LayerNorms, token scoring and exchange (threshold 0.02) before the last block of each encoder
stage, a PixelShuffle decoder with skips, the late ensemble) and discriminator dis_bX (the same
encoder on concat(input, image), sigmoid patch scores); stochastic depth 0.1 in both, on in
evaluation too (the official never switches G to eval mode). Adam (0.5, 0.999) with learning
rates 2e-4 times the batch size for both (`train.lr_times_batch`); pixel L1 weight 100 on
every branch and the ensemble; L1 lambda 1e-3 on the sum of every token score; batch 1, 300
epochs, resize 286 + random 256 crop + flip, evaluation every 5 epochs. Data as
configs/taskonomy_cen_shade_texture_to_rgb.py.
"""

from cen_jax import config as config_lib

ARCHS = tuple(f'b{i}' for i in range(6))


def get_config(arch: str = 'b2'):
  if arch not in ARCHS:
    raise ValueError(f'configs/taskonomy_tokenfusion_mit.py:{arch}: expected one of '
                     f'{", ".join(ARCHS)}')
  config = config_lib.translation_config()
  config.modalities = ('reshading', 'edge_texture')
  config.data.target = 'rgb'
  m = config.model
  m.backbone = f'mit_{arch}'
  m.fusion = 'tokenfusion'
  m.threshold = 0.02  # official Attention.forward: TokenExchange(..., mask_threshold=0.02)
  m.drop_path_rate = 0.1
  t = config.train
  t.lr_times_batch = True  # official: Adam(lr=lrG * batch_size), and the same for D
  t.l1_lambda = 1e-3  # official --lamda default, on the token scores
  return config
