"""Label colouring and preview images (inputs, ground truth, each output's prediction).

Colour convention (as in the official code, which draws class c with cmap[c + 1] and the
wrapped-around ignore label with cmap[0]): class c gets the PASCAL-VOC colour of id c + 1,
so no class is black, and the ignore label 255 is black.
"""

import functools
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cen_jax.io_utils import atomic_write

IGNORE_LABEL = 255
IGNORE_COLOR = (0, 0, 0)
CAPTION_HEIGHT = 14  # pixels above each panel for its name
GAP = 2  # white pixels between panels


def _voc_color(index: int) -> tuple:
  """PASCAL-VOC colour map: the bits of index spread over the high bits of r, g, b.
  Distinct for every index below 2**24."""
  r = g = b = 0
  c = index
  for j in range(8):
    r |= ((c >> 0) & 1) << (7 - j)
    g |= ((c >> 1) & 1) << (7 - j)
    b |= ((c >> 2) & 1) << (7 - j)
    c >>= 3
  return r, g, b


def palette(num_classes: int = 256) -> np.ndarray:
  """uint8 [max(num_classes, 256), 3]: row c is class c's colour, row 255 is black.

  With num_classes > 255, class 255 would share the ignore colour (not a case here).
  """
  return _palette(max(int(num_classes), 256)).copy()


@functools.lru_cache(maxsize=8)
def _palette(n: int) -> np.ndarray:
  colors = np.array([_voc_color(i + 1) for i in range(n)], np.uint8)
  colors[IGNORE_LABEL] = IGNORE_COLOR
  colors.flags.writeable = False  # shared by the cache
  return colors


def colorize(mask) -> np.ndarray:
  """Integer label map [H, W] -> uint8 [H, W, 3]. Negative values draw as ignore."""
  mask = np.asarray(mask)
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f'expected an integer mask, got {mask.dtype}')
  mask = np.where(mask < 0, IGNORE_LABEL, mask).astype(np.int64)
  top = int(mask.max()) + 1 if mask.size else 0
  return _palette(max(top, 256))[mask]


def overlay(rgb, mask, alpha: float = 0.5) -> np.ndarray:
  """Blends the colourised mask over an uint8 [H, W, 3] image; ignore pixels keep the
  image unchanged so the overlay shows where labels are missing."""
  rgb = np.asarray(rgb)
  mask = np.asarray(mask)
  if rgb.shape[:2] != mask.shape:
    raise ValueError(f'image {rgb.shape} and mask {mask.shape} differ in size')
  blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
  blend = np.clip(np.round(blend), 0, 255).astype(np.uint8)
  keep = (mask == IGNORE_LABEL) | (mask < 0)
  return np.where(keep[..., None], rgb.astype(np.uint8), blend)


def _as_rgb(image, size) -> np.ndarray:
  """uint8 [h, w] or [h, w, 3] -> uint8 [H, W, 3]; nearest resize if the size differs."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected [H, W, 3], got {image.shape}')
  if image.shape[:2] != tuple(size):
    h, w = size
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.NEAREST))
  return image


def _captioned(panel: np.ndarray, caption: str) -> np.ndarray:
  """The panel with a white strip above it holding the caption in PIL's built-in font."""
  h, w, _ = panel.shape
  canvas = Image.new('RGB', (w, h + CAPTION_HEIGHT), (255, 255, 255))
  canvas.paste(Image.fromarray(panel), (0, CAPTION_HEIGHT))
  ImageDraw.Draw(canvas).text((2, 1), caption, fill=(0, 0, 0), font=ImageFont.load_default())
  return np.asarray(canvas)


def preview_grid(inputs: Mapping[str, np.ndarray], label,
                 predictions: Mapping[str, np.ndarray]) -> np.ndarray:
  """One row for one example: each input, the ground truth, then each prediction.

  Captions: the input names, 'ground truth', and '<output> pred'.

  Args:
    inputs: {modality: uint8 [H, W, 3] (or [H, W])}, resized to the label's size if needed.
    label: integer [H, W] ground truth (255 = ignore, drawn black).
    predictions: {output name, e.g. 'rgb', 'depth', 'ensemble': integer [H, W]}.

  Returns:
    uint8 [CAPTION_HEIGHT + H, P * W + (P - 1) * GAP, 3] with P = panel count; rows for
    several examples stack with np.concatenate(axis=0).
  """
  label = np.asarray(label)
  size = label.shape
  panels = [(name, _as_rgb(image, size)) for name, image in inputs.items()]
  panels.append(('ground truth', colorize(label)))
  for name, pred in predictions.items():
    pred = np.asarray(pred)
    if pred.shape != size:
      raise ValueError(f'prediction {name!r} is {pred.shape}, label is {size}')
    panels.append((f'{name} pred', colorize(pred)))  # tells input rgb from pred rgb
  return captioned_row(panels)


def captioned_row(panels) -> np.ndarray:
  """[(caption, uint8 [H, W, 3])] of equal sizes -> one row, a caption above each panel and
  GAP white pixels between panels: uint8 [CAPTION_HEIGHT + H, P * W + (P - 1) * GAP, 3]."""
  captioned = [_captioned(panel, name) for name, panel in panels]
  gap = np.full((captioned[0].shape[0], GAP, 3), 255, np.uint8)
  row = [captioned[0]]
  for panel in captioned[1:]:
    row += [gap, panel]
  return np.concatenate(row, axis=1)


def to_uint8_image(x) -> np.ndarray:
  """A [-1, 1] float image (a translation input, target or output) -> uint8, as the official
  de-normalisation ((x + 1) / 2 * 255, clipped, rounded)."""
  x = (np.asarray(x, np.float64) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def save_figure(path: str, fig) -> None:
  """A matplotlib figure -> PNG at `path` (atomically, as save_png); closes the figure."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
  plt.close(fig)
  save_png(path, np.ascontiguousarray(image))


def save_png(path: str, image) -> None:
  """Writes a uint8 [H, W] or [H, W, 3] image as PNG via temp file + os.replace, so a
  reader never sees a partial file; creates parent directories."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected uint8, got {image.dtype}')
  with atomic_write(path, 'wb') as f:
    Image.fromarray(image).save(f, format='PNG')
