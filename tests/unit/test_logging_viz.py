"""MetricWriter, ProgressBar, atomic JSON, palette/colorize/preview/save_png."""

import glob
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from cen_jax import run_log as log_lib
from cen_jax import viz


def read_events(logdir):
  """All Event protos in a TensorBoard log dir (plain TFRecord framing; no TF needed)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, '**', 'events.out.tfevents.*'),
                               recursive=True)):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      pos += 12  # length + its crc
      event = event_pb2.Event()
      event.ParseFromString(data[pos:pos + length])
      events.append(event)
      pos += length + 4  # payload + its crc
  return events


def tb_scalars(logdir):
  out = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out[(value.tag, event.step)] = value.simple_value
  return out


# ----------------------------------------------------------------------------- logging

def test_stdlib_logging_not_shadowed():
  import logging
  assert hasattr(logging, 'getLogger') and logging is not log_lib
  assert log_lib.__name__ == 'cen_jax.run_log'


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / 'run')
  with log_lib.MetricWriter(workdir) as writer:
    writer.write_scalars(10, {'loss/total': np.float32(0.5), 'lr': 1e-3,
                              'eval': {'rgb': {'miou': 41.25}}})
    writer.write_scalars(20, {'loss/total': np.array(0.25)})
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)
  assert first == {'step': 10, 'loss/total': 0.5, 'lr': 1e-3, 'eval/rgb/miou': 41.25}
  assert type(first['step']) is int and type(first['loss/total']) is float
  assert second == {'step': 20, 'loss/total': 0.25}

  scalars = tb_scalars(os.path.join(workdir, 'tensorboard'))
  assert scalars[('loss/total', 10)] == pytest.approx(0.5)
  assert scalars[('loss/total', 20)] == pytest.approx(0.25)
  assert scalars[('eval/rgb/miou', 10)] == pytest.approx(41.25)
  assert scalars[('lr', 10)] == pytest.approx(1e-3)


def test_metric_writer_appends_on_resume(tmp_path):
  for step in (1, 2):
    with log_lib.MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(step, {'x': step})
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')]
  assert steps == [1, 2]


def test_metric_writer_images(tmp_path):
  image = np.zeros((6, 8, 3), np.uint8)
  image[:, :4] = (255, 0, 0)
  with log_lib.MetricWriter(str(tmp_path)) as writer:
    writer.write_images(5, {'preview': image})
    with pytest.raises(ValueError):
      writer.write_images(5, {'bad': image.astype(np.float32)})
  found = [v for e in read_events(str(tmp_path / 'tensorboard')) for v in e.summary.value
           if v.HasField('image')]
  assert [v.tag for v in found] == ['preview']
  decoded = np.asarray(Image.open(io.BytesIO(found[0].image.encoded_image_string)))
  np.testing.assert_array_equal(decoded[..., :3], image)


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = log_lib.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_images(1, {'x': np.zeros((2, 2, 3), np.uint8)})
  writer.close()
  assert not workdir.exists()


def test_write_json_atomic(tmp_path):
  path = tmp_path / 'sub' / 'eval_results.json'
  log_lib.write_json_atomic(str(path), {'step': np.int64(3), 'miou': np.float32(50.5),
                                        'conf': np.eye(2, dtype=np.int64)})
  log_lib.write_json_atomic(str(path), {'step': 4, 'miou': 51.0})  # overwrite
  assert json.loads(path.read_text()) == {'step': 4, 'miou': 51.0}
  assert os.listdir(path.parent) == ['eval_results.json']


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
  path = tmp_path / 'r.json'
  log_lib.write_json_atomic(str(path), {'a': 1})
  with pytest.raises(TypeError):
    log_lib.write_json_atomic(str(path), {'a': object()})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['r.json']


def test_progress_bar_prints_lines_off_tty():
  stream = io.StringIO()  # not a TTY: whole lines, no carriage returns
  bar = log_lib.ProgressBar(10, initial=2, stream=stream, log_interval_s=0.0)
  for _ in range(8):
    bar.update(1)
  bar.set_postfix(loss=0.5)
  bar.write('step 10: ensemble mIoU 40.00')
  bar.close()
  text = stream.getvalue()
  assert '\r' not in text
  lines = text.splitlines()
  assert len(lines) >= 3
  assert any('10/10' in line for line in lines)
  assert any('3/10' in line for line in lines)
  assert 'loss=0.5' in lines[-1] or any('loss=0.5' in line for line in lines)
  assert 'step 10: ensemble mIoU 40.00' in lines
  assert any('step/s' in line or 's/step' in line for line in lines)  # rate shown


def test_progress_bar_rate_limited_off_tty():
  stream = io.StringIO()
  with log_lib.ProgressBar(1000, stream=stream, log_interval_s=3600.0) as bar:
    for _ in range(1000):
      bar.update(1)
  lines = stream.getvalue().splitlines()
  assert 1 <= len(lines) <= 3  # start and close, not one per step
  assert '1000/1000' in lines[-1]


def test_progress_bar_disabled_is_silent():
  stream = io.StringIO()
  bar = log_lib.ProgressBar(5, stream=stream, enabled=False)
  bar.update(3)
  bar.set_postfix(loss=1.0)
  bar.write('hello')
  bar.close()
  assert stream.getvalue() == ''


# ----------------------------------------------------------------------------- viz

def test_palette_distinct_and_ignore_black():
  for k in (21, 40, 256):
    pal = viz.palette(k)
    assert pal.dtype == np.uint8 and pal.shape == (max(k, 256), 3)
    assert len({tuple(c) for c in pal[:k]} - {(0, 0, 0)}) == min(k, 255)
  pal = viz.palette(40)
  assert tuple(pal[255]) == (0, 0, 0)
  # VOC colours shifted by one (official cmap[c + 1]): class 0 is VOC id 1.
  assert tuple(pal[0]) == (128, 0, 0)
  assert tuple(pal[1]) == (0, 128, 0)
  assert tuple(pal[2]) == (128, 128, 0)
  assert tuple(pal[6]) == (128, 128, 128)
  assert viz.palette(300).shape == (300, 3)


def test_colorize_exact_colours():
  mask = np.array([[0, 1], [255, 2]], np.int32)
  out = viz.colorize(mask)
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  pal = viz.palette(3)
  np.testing.assert_array_equal(out[0, 0], pal[0])
  np.testing.assert_array_equal(out[0, 1], pal[1])
  np.testing.assert_array_equal(out[1, 0], [0, 0, 0])
  np.testing.assert_array_equal(out[1, 1], pal[2])
  np.testing.assert_array_equal(viz.colorize(mask.astype(np.uint8)), out)
  with pytest.raises(ValueError):
    viz.colorize(mask.astype(np.float32))


def test_overlay_blends_and_keeps_ignore():
  rgb = np.full((2, 2, 3), 100, np.uint8)
  mask = np.array([[0, 255], [1, 1]])
  out = viz.overlay(rgb, mask, alpha=0.5)
  assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
  np.testing.assert_array_equal(out[0, 1], [100, 100, 100])
  np.testing.assert_array_equal(out[0, 0], [114, 50, 50])  # (100 + 128) / 2, 100 / 2
  np.testing.assert_array_equal(viz.overlay(rgb, mask, alpha=0.0), rgb)


def test_preview_grid_shape_and_panels():
  h, w = 20, 30
  rng = np.random.default_rng(0)
  inputs = {'rgb': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            'depth': rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
  label = rng.integers(0, 5, (h, w)).astype(np.uint8)
  label[0, 0] = 255
  preds = {n: rng.integers(0, 5, (h, w)) for n in ('rgb', 'depth', 'ensemble')}
  grid = viz.preview_grid(inputs, label, preds)
  panels = 2 + 1 + 3
  assert grid.dtype == np.uint8
  assert grid.shape == (viz.CAPTION_HEIGHT + h, panels * w + (panels - 1) * viz.GAP, 3)
  top = viz.CAPTION_HEIGHT
  # Panel order: inputs, ground truth, predictions.
  np.testing.assert_array_equal(grid[top:, :w], inputs['rgb'])
  x_gt = 2 * (w + viz.GAP)
  np.testing.assert_array_equal(grid[top:, x_gt:x_gt + w], viz.colorize(label))
  x_ens = 5 * (w + viz.GAP)
  np.testing.assert_array_equal(grid[top:, x_ens:x_ens + w], viz.colorize(preds['ensemble']))
  # Captions drew something dark on the white strip.
  assert grid[:top].min() < 128
  # Rows for several examples stack.
  assert np.concatenate([grid, grid]).shape[0] == 2 * grid.shape[0]


def test_preview_grid_resizes_inputs_and_checks_predictions():
  label = np.zeros((8, 8), np.int32)
  grid = viz.preview_grid({'rgb': np.zeros((4, 4, 3), np.uint8)}, label,
                          {'ensemble': label})
  assert grid.shape == (viz.CAPTION_HEIGHT + 8, 3 * 8 + 2 * viz.GAP, 3)
  with pytest.raises(ValueError):
    viz.preview_grid({}, label, {'ensemble': np.zeros((4, 8), np.int32)})


def test_save_png_round_trip(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  path = tmp_path / 'previews' / 'step_0000010.png'
  viz.save_png(str(path), image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert os.listdir(path.parent) == ['step_0000010.png']
  with pytest.raises(ValueError):
    viz.save_png(str(path), image.astype(np.float32))
  assert os.listdir(path.parent) == ['step_0000010.png']
