"""The README's Python API example and examples/train_own_loop.py run as a user runs them, from
a directory outside the checkout."""

import os
import re
import subprocess
import sys

from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args, cwd):
  env = child_env()  # one CPU device
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def readme_api_example() -> str:
  readme = open(os.path.join(ROOT, 'README.md')).read()
  section = readme.split('## Python API', 1)[1].split('\n## ', 1)[0]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) == 1, 'the Python API section holds one example'
  return blocks[0]


def test_readme_python_api_example(tmp_path):
  code = readme_api_example()
  assert len(code.strip().splitlines()) <= 20
  out = run(['-c', code], cwd=tmp_path).splitlines()
  assert out[0] == '(1, 16, 16, 7)'  # ensemble logits [N, H/4, W/4, classes]
  blocks = [line.split()[0] for line in out[1:]]
  assert blocks == ['layer1_0', 'layer2_0', 'layer3_0', 'layer4_0']  # the demo's bottlenecks
  assert all('(2, ' in line for line in out[1:])  # [M = 2, C] scales


def test_train_in_your_own_loop(tmp_path):
  out = run([os.path.join(ROOT, 'examples', 'train_own_loop.py'), str(tmp_path / 'tfds'), '50',
             'tiny'], cwd=tmp_path)
  assert 'step 50: loss' in out
  scores = eval(out.strip().splitlines()[-1])  # {'rgb': ..., 'depth': ..., 'ensemble': ...}
  assert set(scores) == {'rgb', 'depth', 'ensemble'}
  assert all(0.0 <= v <= 100.0 for v in scores.values())
