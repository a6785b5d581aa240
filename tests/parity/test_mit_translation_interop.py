"""Official TokenFusion translation checkpoints through main.py: import checkpoint-gen.pkl /
-dis.pkl (torch.save of the DataParallel state_dicts, 'module.' keys), then
`predict --save_logits` reproduces the PyTorch reference generator on the same files, with
tokens exchanged, and `export` writes state_dicts equal to the imported ones. Needs torch (runs
in the torch venv of scripts/test.sh)."""

import copy
import os

import numpy as np
import pytest

from tests.e2e.test_end_to_end import ROOT, run_main
from tests.parity.test_translation_interop import import_and_predict

torch = pytest.importorskip('torch')
from tests.parity.test_mit_translation_torch import (  # noqa: E402  (needs torch)
    DEPTHS, EMBED_DIMS, numpy_state, torch_dis, torch_gen)

CONFIG = os.path.join(ROOT, 'configs', 'taskonomy_tokenfusion_mit.py') + ':b0'
SIZE = 64
OVERRIDES = [f'--config.model.mit_embed_dims={EMBED_DIMS}', f'--config.model.mit_depths={DEPTHS}',
             f'--config.data.crop_size={SIZE}', f'--config.data.load_size={SIZE + 8}',
             '--config.model.test_dropout=False']  # stochastic depth off in predict


def test_import_predict_export_match_the_reference(tmp_path):
  tg, td = torch_gen(seed=0, fusion='tokenfusion'), torch_dis(seed=1)
  gen_path, dis_path = str(tmp_path / 'checkpoint-gen.pkl'), str(tmp_path / 'checkpoint-dis.pkl')
  originals = {}
  for path, module in ((gen_path, tg), (dis_path, td)):
    originals[os.path.basename(path)] = numpy_state(module)
    torch.save({f'module.{k}': v for k, v in module.state_dict().items()}, path)

  x, out_dir, workdir, data_dir = import_and_predict(tmp_path, CONFIG, [gen_path, dis_path],
                                                     OVERRIDES, SIZE)
  # The reference in float64: the float32 reference's own rounding depends on the state of
  # the heap (docs/benchmarks.md, Host memory: 4.4e-5 here in one run, against 7e-7 in a fresh
  # process); cen-jax's float32 is compared with the exact computation.
  with torch.no_grad():
    outs, _, masks = copy.deepcopy(tg).double()(
        [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None]).astype(np.float64))
         for a in x])
  assert min(float((m < 0.02).float().mean()) for m in masks[0]) > 0  # tokens exchanged
  for o, name in enumerate(('reshading', 'edge_texture', 'ensemble')):
    expected = outs[o][0].numpy().transpose(1, 2, 0)
    got = np.load(os.path.join(out_dir, f'reshading_{name}.npy'))
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f'predict vs reference, {name}: max|err|/max|out| = {error:.2e}')
    assert error < 1e-5, (name, error)

  # Export: the same state_dicts again (keys with 'module.', values), strictly loadable. (In
  # cen-jax's module order, not torch's registration order: load_state_dict reads by name.)
  export_dir = str(tmp_path / 'exported')
  run_main(f'--config={CONFIG}', f'--workdir={workdir}', '--mode=export',
           f'--output={export_dir}', *OVERRIDES, data_dir=data_dir)
  for name, module in (('checkpoint-gen.pkl', tg), ('checkpoint-dis.pkl', td)):
    exported = torch.load(os.path.join(export_dir, name))
    original = originals[name]
    assert sorted(exported) == sorted(f'module.{k}' for k in original)
    for key, value in original.items():
      np.testing.assert_array_equal(exported[f'module.{key}'].numpy(), value, err_msg=key)
    module.load_state_dict({k.removeprefix('module.'): v for k, v in exported.items()},
                           strict=True)
