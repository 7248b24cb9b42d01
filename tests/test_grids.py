"""Grid layout, PNG round trip, uint8 conversion and the TensorBoard hook."""

import numpy as np
import pytest
from clu import metric_writers

from fae_jax.evaluation import grids


def _distinct_images(n, h=2, w=3):
  # Every entry differs from every other (while there are fewer than 251 entries).
  return (np.arange(n * h * w * 3).reshape(n, h, w, 3) % 251).astype(np.uint8)


def test_make_grid_exact_pixel_placement():
  images = _distinct_images(5)
  grid = grids.make_grid(images, cols=3, pad=1, pad_value=200)
  h, w = 2, 3
  assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, 3) and grid.dtype == np.uint8
  mask = np.zeros(grid.shape[:2], bool)
  for i in range(5):
    r, c = divmod(i, 3)
    top, left = 1 + r * (h + 1), 1 + c * (w + 1)
    np.testing.assert_array_equal(grid[top : top + h, left : left + w], images[i])
    mask[top : top + h, left : left + w] = True
  # Everything else (separators, border, the empty sixth cell) is the pad colour.
  assert np.all(grid[~mask] == 200)
  assert np.all(grid[4:6, 9:12] == 200)  # sixth cell


def test_make_grid_rgb_pad_gray_input_and_float_input():
  gray = np.array([[[0, 255]], [[10, 20]]], np.uint8)  # [2, 1, 2]
  grid = grids.make_grid(gray, cols=2, pad=1, pad_value=(1, 2, 3))
  assert grid.shape == (3, 7, 3)
  np.testing.assert_array_equal(grid[1, 1:3], [[0, 0, 0], [255, 255, 255]])
  np.testing.assert_array_equal(grid[1, 4:6], [[10, 10, 10], [20, 20, 20]])
  np.testing.assert_array_equal(grid[0, 0], [1, 2, 3])
  floats = np.full((1, 2, 2, 3), -1.0, np.float32)
  np.testing.assert_array_equal(grids.make_grid(floats, cols=4, pad=0), np.zeros((2, 2, 3)))


def test_side_by_side_pairs_in_columns():
  o = _distinct_images(3, 2, 2)
  r = 255 - o
  grid = grids.side_by_side(o, r, pairs_per_row=2, upscale=2, pad=1)
  size = 4  # 2 px upscaled by 2
  assert grid.shape == (2 * (size + 1) + 1, 4 * (size + 1) + 1, 3)

  def cell(row, col):
    top, left = 1 + row * (size + 1), 1 + col * (size + 1)
    return grid[top : top + size, left : left + size]

  for i in range(3):
    row, pair = divmod(i, 2)
    np.testing.assert_array_equal(cell(row, 2 * pair), grids.upscale_nearest(o[i], 2))
    np.testing.assert_array_equal(cell(row, 2 * pair + 1), grids.upscale_nearest(r[i], 2))
  with pytest.raises(ValueError, match="differ"):
    grids.side_by_side(o, r[:2])


def test_upscale_nearest():
  x = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
  up = grids.upscale_nearest(x, 3)
  assert up.shape == (1, 6, 6, 1)
  np.testing.assert_array_equal(up[0, :, :, 0], np.kron([[0, 1], [2, 3]], np.ones((3, 3))))
  with pytest.raises(ValueError):
    grids.upscale_nearest(x, 0)


def test_to_uint8_boundaries():
  x = np.array([-1.5, -1.0, -1.0 + 1 / 127.5, 0.0, 1.0 - 1 / 127.5, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(grids.to_uint8(x), [0, 0, 1, 128, 254, 255, 255])
  # Rounding, not truncation: just below and above the half step.
  half = -1.0 + 0.5 / 127.5
  np.testing.assert_array_equal(grids.to_uint8(np.array([half - 1e-4, half + 1e-4])), [0, 1])
  u = np.array([0, 7, 255], np.uint8)
  assert grids.to_uint8(u) is u
  with pytest.raises(ValueError, match="NaN"):
    grids.to_uint8(np.array([0.0, np.nan]))
  with pytest.raises(ValueError, match="dtype"):
    grids.to_uint8(np.array([1, 2], np.int32))


def test_png_round_trip(tmp_path):
  grid = grids.make_grid(_distinct_images(4, 5, 7), cols=2)
  path = tmp_path / "eval" / "samples.png"
  grids.save_png(path, grid)
  assert sorted(p.name for p in path.parent.iterdir()) == ["samples.png"]  # temp renamed away
  np.testing.assert_array_equal(grids.load_png(path), grid)
  grids.save_png(path, np.zeros((3, 3, 3), np.uint8))  # overwrite in place
  np.testing.assert_array_equal(grids.load_png(path), np.zeros((3, 3, 3)))


def test_write_grid_to_tensorboard():
  class Recorder:
    def __init__(self):
      self.calls = []

    def write_images(self, step, images):
      self.calls.append((step, images))

  writer = Recorder()
  grid = grids.make_grid(_distinct_images(2), cols=2)
  grids.write_grid_to_tensorboard(writer, 7, "eval/samples", grid)
  ((step, images),) = writer.calls
  assert step == 7 and list(images) == ["eval/samples"]
  np.testing.assert_array_equal(images["eval/samples"], grid[None])
  # The real clu writer accepts it too.
  grids.write_grid_to_tensorboard(metric_writers.LoggingWriter(), 7, "eval/samples", grid)
