"""Training CEN in your own loop, with the library's model, step and data, without main.py.

    python examples/train_own_loop.py [DATA_DIR] [STEPS] [SCENES]

(SCENES: the synthetic scenes' builder config, 'default' or the seconds-fast 'tiny').

The segmentation task supplies the pieces: the network (shared convolutions, private BN), the
per-device train step (official losses, L1 on the partitioned bn2 scales, staged SGD) and the
samples the input pipeline turns into batches. Here a plain Python loop runs the step under
jax.pmap over this machine's devices, prints the loss and the share of exchanged channels, and
evaluates with the one evaluate loop. Checkpoints, resume and logging are what main.py adds.
"""

import sys

import jax
import numpy as np

from cen_jax import input_pipeline, runtime
from cen_jax.configs import demo
from cen_jax.tasks import segmentation as seg

data_dir = sys.argv[1] if len(sys.argv) > 1 else 'tfds_data'
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
scenes = sys.argv[3] if len(sys.argv) > 3 else 'default'

config = demo.get_config()
config.data.data_dir = data_dir
config.data.builder_config = scenes
model = seg.build(config)  # collectives on runtime.AXIS, the pmap axis below
state = seg.state_from_variables(config, seg.init_variables(config, model, jax.random.key(0)))

num_train = input_pipeline.num_examples(config, config.data.train_split)  # prepares once
starts = seg.stage_starts(config, num_train // config.train.batch_size)
step_fn = jax.pmap(seg.make_train_step(config, model, starts), axis_name=runtime.AXIS,
                   in_axes=(None, 0), out_axes=(None, None))
batches = input_pipeline.train_iterator(config, seg.train_sample(config), seed=0)
num_devices = jax.local_device_count()

for step in range(steps):
  batch = runtime.device_batch(config, next(batches), num_devices, for_pmap=True,
                               keys=seg.BATCH_KEYS)
  state, scalars = step_fn(state, batch)
  if (step + 1) % 50 == 0:
    exchanged = {k: round(float(v), 3) for k, v in scalars.items() if 'below' in k}
    print(f'step {step + 1}: loss {float(scalars["loss/total"]):.3f}, exchanged {exchanged}')

results = seg.evaluate(config, model, seg.eval_variables(state), split=config.data.eval_split,
                       step=steps)
print({name: round(s['miou'], 2) for name, s in results['metrics'].items()})
assert np.isfinite(float(scalars['loss/total']))
