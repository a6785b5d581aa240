"""Official translation checkpoints through main.py: import checkpoint-gen.pkl / -dis.pkl, then
`predict --save_logits` reproduces the PyTorch reference generator on the same files, and
`export` writes state_dicts equal to the imported ones that load strictly into the reference.
Needs torch (runs in the torch venv of scripts/test.sh)."""

import os

import numpy as np
from PIL import Image

from tests.e2e.test_end_to_end import ROOT, run_main
from tests.parity.test_pix2pix import _randomize_torch, _reference, _state_dict_numpy, _torch

CONFIG = os.path.join(ROOT, 'configs', 'taskonomy_cen_shade_texture_to_rgb.py')
SIZE, NGF, NDF = 64, 8, 8
OVERRIDES = [f'--config.model.ngf={NGF}', f'--config.model.ndf={NDF}',
             f'--config.data.crop_size={SIZE}', f'--config.data.load_size={SIZE + 8}',
             '--config.model.test_dropout=False']


def import_and_predict(tmp_path, config, checkpoints, overrides, size):
  """main.py --mode import of `checkpoints`, then --mode predict --save_logits on two
  Taskonomy-style files (8-bit grey shading, 16-bit texture edges, 80x80: resized). Returns
  the preprocessed inputs [S, S, 3] per domain, the output, work and data folders."""
  from cen_jax import preprocess
  from cen_jax.tasks import translation_data
  rng = np.random.default_rng(0)
  files = {'reshading': rng.integers(0, 256, (80, 80), dtype=np.uint8),
           'edge_texture': rng.integers(0, 11356, (80, 80), dtype=np.uint16)}
  paths = []
  for name, array in files.items():
    paths.append(str(tmp_path / f'{name}.png'))
    Image.fromarray(array).save(paths[-1])
  workdir, out_dir = str(tmp_path / 'work'), str(tmp_path / 'out')
  data_dir = str(tmp_path / 'tfds')
  run_main(f'--config={config}', f'--workdir={workdir}', '--mode=import',
           *[f'--torch_checkpoint={c}' for c in checkpoints], *overrides, data_dir=data_dir)
  run_main(f'--config={config}', f'--workdir={workdir}', '--mode=predict',
           *[f'--inputs={p}' for p in paths], f'--output={out_dir}', '--save_logits',
           *overrides, data_dir=data_dir)
  x = [translation_data.to_unit_range(translation_data.resize(
      preprocess.preprocess_domain(name, array), size)) for name, array in files.items()]
  return x, out_dir, workdir, data_dir


def test_import_predict_export_match_the_reference(tmp_path):
  torch, ref = _torch(), _reference()
  num_downs = int(np.log2(SIZE))
  tg = ref.Generator(2, num_filter=NGF, num_downs=num_downs, threshold=1e-2)
  td = ref.Discriminator(num_filter=NDF)
  _randomize_torch(tg, seed=5, threshold=1e-2)
  _randomize_torch(td, seed=6, threshold=1e-2)
  gen_path, dis_path = str(tmp_path / 'checkpoint-gen.pkl'), str(tmp_path / 'checkpoint-dis.pkl')
  torch.save(tg.state_dict(), gen_path)  # the official format: a plain state_dict
  torch.save(td.state_dict(), dis_path)
  originals = {'checkpoint-gen.pkl': _state_dict_numpy(tg),
               'checkpoint-dis.pkl': _state_dict_numpy(td)}

  x, out_dir, workdir, data_dir = import_and_predict(tmp_path, CONFIG, [gen_path, dis_path],
                                                     OVERRIDES, SIZE)
  # The reference on the same preprocessed inputs: train mode (instance statistics, as the
  # official G always runs), dropout off.
  tg.train()
  for module in tg.modules():
    if isinstance(module, torch.nn.Dropout):
      module.eval()
  with torch.no_grad():
    outs, _ = tg([torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None]))
                  for a in x])
  for o, name in enumerate(('reshading', 'edge_texture', 'ensemble')):
    expected = outs[o][0].numpy().transpose(1, 2, 0)
    got = np.load(os.path.join(out_dir, f'reshading_{name}.npy'))
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f'predict vs reference, {name}: max|err|/max|out| = {error:.2e}')
    assert error < 1e-5, (name, error)

  # Export: the same state_dicts again (values, keys and order), strictly loadable.
  export_dir = str(tmp_path / 'exported')
  run_main(f'--config={CONFIG}', f'--workdir={workdir}', '--mode=export',
           f'--output={export_dir}', *OVERRIDES, data_dir=data_dir)
  for path, module in (('checkpoint-gen.pkl', tg), ('checkpoint-dis.pkl', td)):
    exported = torch.load(os.path.join(export_dir, path))
    original = originals[path]  # (the reference forward above moved tg's running stats)
    assert list(exported) == list(original)
    for key, value in original.items():
      if key.endswith('num_batches_tracked'):
        continue  # not kept (torch never reads it: momentum is set)
      np.testing.assert_array_equal(exported[key].numpy(), value, err_msg=key)
    module.load_state_dict(exported, strict=True)


def test_import_of_a_discriminator_as_generator_is_one_line(tmp_path):
  torch, ref = _torch(), _reference()
  td = ref.Discriminator(num_filter=NDF)
  path = str(tmp_path / 'checkpoint-dis.pkl')
  torch.save(td.state_dict(), path)
  proc = run_main(f'--config={CONFIG}', f'--workdir={tmp_path / "w"}', '--mode=import',
                  f'--torch_checkpoint={path}', *OVERRIDES, data_dir=str(tmp_path / 'tfds'),
                  check=False)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith('error:'), proc.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints') or \
      not os.listdir(tmp_path / 'w' / 'checkpoints')

