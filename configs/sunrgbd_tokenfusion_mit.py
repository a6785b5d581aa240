"""TokenFusion, SegFormer MiT-B0..B5 with the SegFormer head, SUN RGB-D 37 classes, RGB + depth:
the NYUDv2 TokenFusion recipe (configs/nyudv2_tokenfusion_mit.py) on SUN RGB-D's data settings
(configs/sunrgbd_cen_r101.py: 37 classes, depth stretched per image to [0, 255]).

`--config configs/sunrgbd_tokenfusion_mit.py:b3` (or :b0 .. :b5). The official TokenFusion code
trains segmentation on NYUDv2 only (its SUN RGB-D code is 3D detection), so this recipe is ours:
every training key is the NYUDv2 one.
"""

from cen_jax.configs import nyudv2_tokenfusion_mit
from cen_jax.configs import sunrgbd_cen_r101


def get_config(size: str = 'b3'):
  config = nyudv2_tokenfusion_mit.get_config(size)
  sun = sunrgbd_cen_r101.get_config()
  config.model.num_classes = sun.model.num_classes
  config.data.name = sun.data.name
  config.data.depth_scale = sun.data.depth_scale
  return config
