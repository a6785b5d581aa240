"""The Mix Transformer wired into the segmentation task (issue 28): config.model.backbone
'mit_b0'..'mit_b5' builds TokenFusion's segmenter with the official parameter counts, a fusion
that does not fit a backbone is refused in one line, and every MiT fusion point acts as defined
(docs/fusions.md), on tiny networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax.fusion import ops, registry
from cen_jax.models import build_model, count_params
from cen_jax.tasks import segmentation

# The official WeTr(mit_bX, num_classes=40), M = 2, counted as the official compute_params.
OFFICIAL_WETR_PARAMS = {'mit_b0': 4_048_794, 'mit_b1': 14_961_914, 'mit_b2': 26_018_426,
                        'mit_b3': 45_917_306, 'mit_b4': 62_708_218, 'mit_b5': 83_331_962}


def mit_config(backbone='mit_b0', fusion='tokenfusion'):
  config = config_lib.base_config()
  config.model.backbone = backbone
  config.model.fusion = fusion
  return config


@pytest.mark.parametrize('backbone', sorted(OFFICIAL_WETR_PARAMS))
def test_backbone_builds_the_official_segmenter_with_its_parameter_count(backbone):
  """What `--mode summary` prints as params, from shapes only (jax.eval_shape)."""
  config = mit_config(backbone)
  variables, _ = segmentation.abstract_variables(config, build_model(config), 2)
  assert count_params(variables['params']) == OFFICIAL_WETR_PARAMS[backbone]


@pytest.mark.parametrize('fusion,backbone', [('average', 'mit_b0'), ('separate', 'mit_b1'),
                                             ('early', 'mit_b3'), ('tokenfusion', 'resnet')])
def test_a_fusion_that_does_not_fit_the_backbone_is_refused_in_one_line(fusion, backbone):
  with pytest.raises(ValueError) as info:
    build_model(mit_config(backbone, fusion))
  message = str(info.value)
  assert '\n' not in message
  assert f'config.model.fusion={fusion!r}' in message
  assert f'config.model.backbone={backbone!r}' in message


def test_fusions_that_fit_the_mit():
  fits = {n for n, f in registry.REGISTRY.items() if registry.fits_backbone(f, 'mit')}
  assert {'tokenfusion', 'cen', 'cen_no_l1', 'cen_l1_all', 'cen_l1_only', 'random_exchange',
          'asymfusion', 'none'} <= fits
  assert not fits & {'average', 'sum', 'separate', 'early'}
  with pytest.raises(ValueError, match="config.model.backbone='mit_b7': expected one of"):
    build_model(mit_config('mit_b7'))


def test_adamw_learning_rate_factor_is_the_official_poly_warmup_per_stage():
  """PolyWarmupAdamW before each step k of a stage: 1 - (1 - k / W)(1 - r) while k < W, then
  (1 - k / T) ** p, held from T on; k restarts with every stage (a new optimiser each)."""
  config = mit_config()
  t = config.train
  t.optimizer = 'adamw'
  t.stage_epochs = (20, 20)
  t.warmup_steps, t.warmup_ratio, t.poly_steps, t.poly_power = 4, 1e-6, 12, 0.5
  starts = segmentation.stage_starts(config, steps_per_epoch=1)

  def official(k):
    if k < 4:
      return 1 - (1 - k / 4) * (1 - 1e-6)
    return (1 - min(k, 11) / 12) ** 0.5

  factor = jax.jit(lambda step: segmentation.adamw_multiplier(config, starts, step))
  got = [float(factor(jnp.int32(step))) for step in range(40)]
  np.testing.assert_allclose(got, [official(step % 20) for step in range(40)], rtol=1e-6)
