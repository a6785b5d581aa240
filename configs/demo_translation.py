"""Translation demo: a small CEN (shading + texture edges -> RGB) on the embedded synthetic
multi-domain scenes (data/synthetic_domains), CPU-sized.

In the synthetic scenes neither input domain alone determines the RGB image (see the builder's
docstring), so the branches gain from exchanging channels. Same recipe as the paper (shared
convolutions, private InstanceNorm, exchange after encoder blocks 2..N-1, L1 on the partitioned
scales, pixel L1 on every output + shared PatchGAN, Adam 2e-4), shrunk to run in minutes:
narrow widths, 64x64 images (6 U-Net levels), batch 8, and a larger sparsity weight so that
scales cross the threshold within the short schedule.
"""

from cen_jax import config as config_lib


def get_config(single_input: str = ''):
  """The CEN translation demo; `configs/demo_translation.py:reshading` or `:edge_texture`, its
  single-domain baselines."""
  if single_input:
    return one_input(single_input)
  config = config_lib.translation_config()
  config.seed = 0
  config.modalities = ('reshading', 'edge_texture')
  config.data.target = 'rgb'

  m = config.model
  m.ngf = 16
  m.ndf = 16

  d = config.data
  d.name = 'synthetic_domains'
  d.builder_config = 'default'  # 64x64
  d.eval_split = 'test'
  d.load_size = 72  # 286 / 256 of the crop, as the official resize-then-crop
  d.crop_size = 64
  d.eval_batch_size = 25

  t = config.train
  t.batch_size = 8
  t.cpu_async_dispatch = True  # 64 MiB of temporaries a step: 2-4% more steps/s than without
  t.num_epochs = 12  # 1,500 steps: the demo runs in under 10 minutes on 2 CPU cores
  t.lr_g = 1e-3
  t.lr_d = 2e-4
  t.l1_lambda = 2e-2
  t.eval_every_epochs = 4
  t.log_every_steps = 25
  t.checkpoint_every_steps = 250

  # Final L1 / RMSE (output, metric, mean, std) over seeds 0-2 on a 2-core Intel Xeon (AVX-512),
  # Python 3.12 + JAX 0.12: `--mode check` compares a finished run with these (docs/demo.md).
  config.expected = (('reshading', 'l1', 0.1352, 0.0012), ('reshading', 'rmse', 0.2466, 0.0019),
                     ('edge_texture', 'l1', 0.1474, 0.0043),
                     ('edge_texture', 'rmse', 0.2496, 0.0070),
                     ('ensemble', 'l1', 0.1297, 0.0013), ('ensemble', 'rmse', 0.2345, 0.0015))
  return config


def one_input(domain):
  """The translation demo's network, data and budget from one domain (M = 1): nothing to
  exchange with, so fusion is 'none' and the sparsity term is off."""
  if domain not in ('reshading', 'edge_texture'):
    raise ValueError(f'configs/demo_translation.py:{domain}: expected reshading or edge_texture '
                     f'(a single-domain baseline), or no argument')
  config = get_config()
  config.modalities = (domain,)
  config.model.fusion = 'none'
  config.train.l1_lambda = 0.0
  l1, rmse = ONE_INPUT_L1_RMSE[domain]  # the branch is the ensemble: the same figures
  config.expected = tuple((output, metric, mean, std) for output in (domain, 'ensemble')
                          for metric, (mean, std) in (('l1', l1), ('rmse', rmse)))
  return config


# Final L1 and RMSE, each (mean, std), of the single-domain baselines over seeds 0-2, measured as
# the CEN run's.
ONE_INPUT_L1_RMSE = {'reshading': ((0.1630, 0.0005), (0.3049, 0.0035)),
                     'edge_texture': ((0.2236, 0.0054), (0.3099, 0.0102))}
