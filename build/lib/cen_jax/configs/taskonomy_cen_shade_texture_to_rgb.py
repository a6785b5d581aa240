"""CEN translation, Taskonomy shade (reshading) + texture edges -> RGB: the official default.

pix2pix U-Net generator (ngf 64, 8 levels at 256x256) with shared convolutions, private
InstanceNorm and channel exchange after encoder blocks 2-7 (threshold 1e-2, L1 lambda 1e-3 on
the partitioned scales); shared PatchGAN discriminator; Adam 2e-4 (0.5, 0.999) for both;
pixel L1 weight 100; batch 1; 300 epochs; resize 286 + random 256 crop + flip; evaluation every
5 epochs on the val list. Data: prepare the official sample building into
config.data.manual_dir (data/taskonomy/taskonomy_dataset_builder.py says what goes where).
"""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.translation_config()
  config.modalities = ('reshading', 'edge_texture')
  config.data.target = 'rgb'
  return config
