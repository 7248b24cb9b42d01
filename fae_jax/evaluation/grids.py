"""Image grids for samples and reconstructions: layout, PNG files and TensorBoard.

Everything works on host NumPy arrays, NHWC. Model outputs in `[-1, 1]` become uint8 through
`to_uint8`; uint8 inputs pass through unchanged.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from PIL import Image

from fae_jax import fileio


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
  """Maps floats in `[-1, 1]` to uint8 `[0, 255]`: `round((x + 1) * 127.5)`, clipped.

  -1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounds half to even); values outside `[-1, 1]` clip.
  uint8 input is returned as is. Any shape.
  """
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"to_uint8: expected uint8 or floats in [-1, 1], got dtype {x.dtype}.")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(
      f"to_uint8: {int(np.sum(~np.isfinite(x)))} NaN/inf pixel value(s); the model producing "
      "these images has diverged."
    )
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _as_rgb_batch(images: np.ndarray | jax.Array, name: str) -> np.ndarray:
  """`[N, H, W]`, `[N, H, W, 1]` or `[N, H, W, 3]` -> uint8 `[N, H, W, 3]`."""
  x = to_uint8(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
      f"{name}: expected images [N, H, W, 3], [N, H, W, 1] or [N, H, W], got {x.shape}."
    )
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def upscale_nearest(images: np.ndarray | jax.Array, factor: int) -> np.ndarray:
  """Repeats every pixel `factor` times along H and W: `[..., H, W, C] -> [..., H*f, W*f, C]`.

  For tiny images (28 px Fashion-MNIST) so a grid is viewable without the viewer blurring it.
  """
  if factor < 1 or int(factor) != factor:
    raise ValueError(f"upscale_nearest: factor must be a positive integer, got {factor}.")
  x = np.asarray(images)
  if x.ndim < 3:
    raise ValueError(f"upscale_nearest: expected [..., H, W, C], got shape {x.shape}.")
  if factor == 1:
    return x
  return np.repeat(np.repeat(x, factor, axis=-3), factor, axis=-2)


def make_grid(
  images: np.ndarray | jax.Array,
  *,
  cols: int,
  pad: int = 2,
  pad_value: int | Sequence[int] = 255,
) -> np.ndarray:
  """Tiles images row-major into one picture: `[N, H, W, 3] -> uint8 [H', W', 3]`.

  `rows = ceil(N / cols)`; `pad` pixels of `pad_value` separate the cells and frame the
  border, so `H' = rows * (H + pad) + pad` and `W' = cols * (W + pad) + pad`. Image `i` has
  its top-left corner at `(pad + (i // cols) * (H + pad), pad + (i % cols) * (W + pad))`.
  Cells after the last image stay `pad_value`.

  Args:
    images: uint8 `[0, 255]` or floats in `[-1, 1]`; `[N, H, W, 3]`, `[N, H, W, 1]` or
      `[N, H, W]` (grayscale is replicated to RGB). N >= 1.
    cols: images per row (fewer if N < cols).
    pad: spacing in pixels.
    pad_value: spacing colour, a gray level or an RGB triple.
  """
  x = _as_rgb_batch(images, "make_grid")
  n, h, w, _ = x.shape
  if n == 0:
    raise ValueError("make_grid: no images.")
  if cols < 1 or pad < 0:
    raise ValueError(f"make_grid: need cols >= 1 and pad >= 0, got cols={cols}, pad={pad}.")
  cols = min(cols, n)
  rows = math.ceil(n / cols)
  fill = np.broadcast_to(np.asarray(pad_value, np.int64), (3,))
  if np.any(fill < 0) or np.any(fill > 255):
    raise ValueError(f"make_grid: pad_value must lie in [0, 255], got {pad_value}.")
  grid = np.empty((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
  grid[...] = fill.astype(np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    grid[top : top + h, left : left + w] = x[i]
  return grid


def side_by_side(
  originals: np.ndarray | jax.Array,
  recons: np.ndarray | jax.Array,
  *,
  pairs_per_row: int = 8,
  upscale: int = 1,
  pad: int = 2,
  pad_value: int | Sequence[int] = 255,
) -> np.ndarray:
  """Grid of (original, reconstruction) pairs: `[N, H, W, 3] x2 -> uint8 [H', W', 3]`.

  Every original is immediately followed, to its right, by its reconstruction; a row holds
  `pairs_per_row` pairs, so columns alternate original / reconstruction (even columns are
  originals). Inputs as `make_grid`; `upscale` enlarges both by nearest-neighbour first.
  """
  o = _as_rgb_batch(originals, "side_by_side")
  r = _as_rgb_batch(recons, "side_by_side")
  if o.shape != r.shape:
    raise ValueError(f"side_by_side: originals {o.shape} and reconstructions {r.shape} differ.")
  pairs = np.stack([o, r], axis=1).reshape((-1, *o.shape[1:]))  # o0, r0, o1, r1, ...
  pairs = upscale_nearest(pairs, upscale)
  return make_grid(pairs, cols=2 * pairs_per_row, pad=pad, pad_value=pad_value)


def save_png(path: str | os.PathLike, grid: np.ndarray) -> None:
  """Writes a uint8 `[H, W, 3]` (or `[H, W]`) image as PNG, atomically (temp file + rename)."""
  grid = to_uint8(grid)
  if grid.ndim == 3 and grid.shape[-1] == 1:
    grid = grid[..., 0]
  if not (grid.ndim == 2 or (grid.ndim == 3 and grid.shape[-1] in (3, 4))):
    raise ValueError(f"save_png: expected [H, W, 3], [H, W, 4] or [H, W], got {grid.shape}.")
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(grid)).save(buf, format="PNG")
  fileio.write_bytes_atomic(path, buf.getvalue())


def load_png(path: str | os.PathLike) -> np.ndarray:
  """Reads a PNG as uint8 `[H, W, 3]` (RGB)."""
  with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as im:
    return np.asarray(im.convert("RGB"))


def write_grid_to_tensorboard(writer: Any, step: int, name: str, grid: np.ndarray) -> None:
  """Logs one grid image through a clu `MetricWriter` (`writer.write_images`) under `name`."""
  grid = to_uint8(grid)
  if grid.ndim == 2:
    grid = grid[..., None]
  writer.write_images(step, {name: grid[None]})
