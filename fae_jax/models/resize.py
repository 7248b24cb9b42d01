"""PyTorch-exact bicubic resizing (`F.interpolate(mode="bicubic", align_corners=False)`) in JAX.

DINOv2 checkpoints resize their position-embedding table with PyTorch's bicubic interpolation,
and the encoder wrapper resizes input images the way torchvision does; `jax.image.resize` differs
from both (cubic coefficient -0.5 everywhere, its own border and antialias rules). Resizing is
separable, so we build one interpolation matrix per axis on the host with numpy, reproducing
ATen's CPU kernels (aten/src/ATen/native/cpu/UpSampleKernel.cpp) step by step, and apply them
with einsum: static shapes, runs on any backend, differentiable.

ATen computes coordinates and weights in the input's precision, so a float32 PyTorch run is up
to ~1e-4 away from the float64 one on 256-pixel images. The matrices reproduce either
arithmetic (`torch_dtype`); the float32 one matches PyTorch's float32 weights bit for bit
(antialiased) or to the rounding of its edge-tap accumulation (~3e-7).

The two PyTorch code paths differ in more than the filter width:

* `antialias=False` (`upsample_bicubic2d`): Keys cubic with a = -0.75 (OpenCV's), four taps
  around `src = (dst + 0.5) * scale - 0.5`, tap indices clamped into the input (edge
  replication), no renormalisation.
* `antialias=True` (`_upsample_bicubic2d_aa`, Pillow's algorithm): Keys cubic with a = -0.5,
  support `2 * max(scale, 1)` input pixels around `center = (dst + 0.5) * scale` with the filter
  stretched by `max(scale, 1)`, the window truncated at the borders and the weights renormalised
  to sum to one. An axis whose size does not change is copied, whatever the scale factor.

In both, `scale` (input pixels per output pixel) is `1 / scale_factor` when a scale factor is
given (PyTorch's `area_pixel_compute_scale`), else `in_size / out_size`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Cubic convolution coefficients (Keys): ATen uses -0.75 without antialias (OpenCV compatible)
# and -0.5 with antialias (Pillow compatible).
_CUBIC_A = -0.75
_CUBIC_A_ANTIALIAS = -0.5

_TORCH_DTYPES = {"float32": np.float32, "float64": np.float64}


def _mul_add(a, b, c):
  """`a * b + c` rounded once when the operands are float32, like a fused multiply-add.

  ATen's CPU kernels are compiled with FMA contraction, which matters in float32 where the
  cubic's terms cancel (weights near 0 differed by ~1e-6 without it). The float64 product of
  two float32 numbers is exact, so one rounding of the float64 sum emulates the FMA.
  """
  if np.result_type(a, b, c) == np.float32:
    f64 = np.float64
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)
  return a * b + c


def _cubic_near(x: np.ndarray, a: np.floating) -> np.ndarray:
  """Keys cubic on |x| <= 1 in ATen's operation order, in the dtype of `x` and `a`."""
  return _mul_add(_mul_add(a + 2, x, -(a + 3)) * x, x, 1)


def _cubic_far(x: np.ndarray, a: np.floating) -> np.ndarray:
  """Keys cubic on 1 < |x| < 2 in ATen's operation order, in the dtype of `x` and `a`."""
  return _mul_add(_mul_add(_mul_add(a, x, -5 * a), x, 8 * a), x, -4 * a)


def _cubic_kernel(x: np.ndarray, a: np.floating) -> np.ndarray:
  x = np.abs(x)
  zero = np.zeros_like(x)
  return np.where(x < 1, _cubic_near(x, a), np.where(x < 2, _cubic_far(x, a), zero))


def _source_scale(in_size: int, out_size: int, scale_factor: float | None, ft: type) -> np.floating:
  """Input pixels per output pixel, as ATen's `area_pixel_compute_scale(align_corners=False)`."""
  if scale_factor is not None:
    return ft(1.0 / scale_factor)  # the division is in double even for float32 inputs
  return ft(in_size) / ft(out_size)


def _matrix_no_antialias(in_size: int, out_size: int, scale: np.floating, ft: type) -> np.ndarray:
  """`upsample_bicubic2d` weights: 4 clamped taps around the source coordinate."""
  f64 = np.float64
  dst = np.arange(out_size, dtype=f64)
  # ATen evaluates `scale * (dst + 0.5) - 0.5` in double and rounds once to the input precision.
  src = (f64(scale) * (dst + 0.5) - 0.5).astype(ft)
  # ATen's guard_index_and_lambda: index clamped to the last pixel, fraction clamped to [0, 1].
  index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - index.astype(ft), ft(0), ft(1))
  one_minus_t = (1.0 - t.astype(f64)).astype(ft)
  a = ft(_CUBIC_A)
  coeffs = np.stack(
    [
      _cubic_far((t.astype(f64) + 1.0).astype(ft), a),
      _cubic_near(t, a),
      _cubic_near(one_minus_t, a),
      _cubic_far((one_minus_t.astype(f64) + 1.0).astype(ft), a),
    ],
    axis=1,
  ).astype(f64)  # [out, 4]
  # Out-of-range taps read the edge pixel, so their weights pile up on it.
  taps = np.clip(index[:, None] + np.arange(-1, 3), 0, in_size - 1)  # [out, 4]
  matrix = np.zeros((out_size, in_size), f64)
  rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
  np.add.at(matrix, (rows, taps), coeffs)
  return matrix


def _matrix_antialias(in_size: int, out_size: int, scale: np.floating, ft: type) -> np.ndarray:
  """`_upsample_bicubic2d_aa` weights: Pillow-style stretched, truncated, normalised filter."""
  if in_size == out_size:
    # ATen skips axes whose size is unchanged, even when a scale factor != 1 was given.
    return np.eye(out_size, dtype=np.float64)
  f64 = np.float64
  support = ft(2.0 * f64(scale)) if scale >= 1.0 else ft(2.0)
  inv_scale = ft(1.0 / f64(scale)) if scale >= 1.0 else ft(1.0)
  max_taps = int(math.ceil(support)) * 2 + 1
  a = ft(_CUBIC_A_ANTIALIAS)
  matrix = np.zeros((out_size, in_size), f64)
  for i in range(out_size):
    center = ft(f64(scale) * (i + 0.5))
    # int() truncates toward zero like ATen's static_cast<int64_t>; `center -+ support` is in
    # the input precision, the `+ 0.5` in double.
    x_min = max(int(f64(center - support) + 0.5), 0)
    x_size = min(int(f64(center + support) + 0.5), in_size) - x_min
    x_size = min(max(x_size, 0), max_taps)
    taps = np.arange(x_min, x_min + x_size).astype(ft)
    offsets = ((taps - center).astype(f64) + 0.5) * f64(inv_scale)
    weights = _cubic_kernel(offsets.astype(ft), a)
    total = ft(0)
    for w in weights:  # sequential, as ATen accumulates
      total = ft(total + w)
    if total != 0:
      weights = weights / total
    matrix[i, x_min : x_min + x_size] = weights.astype(f64)
  return matrix


@functools.lru_cache(maxsize=256)
def _cached_matrix(
  in_size: int, out_size: int, scale_factor: float | None, antialias: bool, torch_dtype: str
) -> np.ndarray:
  ft = _TORCH_DTYPES[torch_dtype]
  scale = _source_scale(in_size, out_size, scale_factor, ft)
  if antialias:
    matrix = _matrix_antialias(in_size, out_size, scale, ft)
  else:
    matrix = _matrix_no_antialias(in_size, out_size, scale, ft)
  matrix.setflags(write=False)
  return matrix


def bicubic_matrix(
  in_size: int,
  out_size: int,
  *,
  scale_factor: float | None = None,
  antialias: bool = False,
  torch_dtype: str = "float64",
) -> np.ndarray:
  """1-D matrix of `F.interpolate(mode="bicubic", align_corners=False)` along one axis.

  Args:
    in_size: input length.
    out_size: output length. With `scale_factor`, it must be what PyTorch derives from it,
      `floor(in_size * scale_factor)`.
    scale_factor: PyTorch's `scale_factor` for this axis. When given, the coordinate mapping
      uses `1 / scale_factor` instead of `in_size / out_size` (they differ, e.g. with DINOv2's
      0.1 offset).
    antialias: PyTorch's `antialias` flag.
    torch_dtype: `"float64"` or `"float32"`: reproduce the weights PyTorch computes for an
      input of this dtype (it computes coordinates and weights in the input's precision).

  Returns:
    `[out_size, in_size]` float64 matrix `W` with `resized = W @ x` along that axis.
  """
  if torch_dtype not in _TORCH_DTYPES:
    raise ValueError(
      f"bicubic_matrix: torch_dtype must be one of {sorted(_TORCH_DTYPES)}, got {torch_dtype!r}."
    )
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic_matrix: sizes must be positive, got {in_size} -> {out_size}.")
  if scale_factor is not None:
    scale_factor = float(scale_factor)
    if not scale_factor > 0.0:
      raise ValueError(f"bicubic_matrix: scale_factor must be > 0, got {scale_factor}.")
    implied = math.floor(float(in_size) * scale_factor)
    if implied != out_size:
      raise ValueError(
        f"bicubic_matrix: scale_factor {scale_factor} maps size {in_size} to "
        f"floor({in_size} * {scale_factor}) = {implied}, not the requested {out_size}; "
        "pass a consistent out_size (PyTorch derives the size from the scale factor)."
      )
  matrix = _cached_matrix(int(in_size), int(out_size), scale_factor, bool(antialias), torch_dtype)
  return matrix.copy()


def resize_bicubic(
  x: jax.Array,
  out_hw: tuple[int, int],
  *,
  scale_factor: tuple[float, float] | None = None,
  antialias: bool = False,
  torch_dtype: str | None = None,
) -> jax.Array:
  """Resizes like `F.interpolate(mode="bicubic", align_corners=False)`, channels last.

  Args:
    x: `[..., H, W, C]` floating-point array, any leading batch dims.
    out_hw: `(out_h, out_w)`.
    scale_factor: optional `(scale_h, scale_w)` as passed to PyTorch; `out_hw` must equal
      `floor((H, W) * scale_factor)`.
    antialias: PyTorch's `antialias` flag (torchvision's `resize(antialias=True)` on floats).
    torch_dtype: whose weights to reproduce (see `bicubic_matrix`); by default PyTorch's for
      the compute dtype, i.e. `"float32"` unless `x` is float64.

  Returns:
    `[..., out_h, out_w, C]` with the dtype of `x`; computed in at least float32 with
    HIGHEST matmul precision. No clipping: bicubic overshoots, as in PyTorch.
  """
  if x.ndim < 3:
    raise ValueError(f"resize_bicubic: expected [..., H, W, C], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f"resize_bicubic: expected a floating-point array, got {x.dtype}; convert images "
      "to float first (PyTorch's uint8 path rounds differently)."
    )
  in_h, in_w = x.shape[-3], x.shape[-2]
  out_h, out_w = (int(s) for s in out_hw)
  scale_h, scale_w = (None, None) if scale_factor is None else scale_factor
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  if torch_dtype is None:
    torch_dtype = "float64" if compute_dtype == jnp.float64 else "float32"
  kwargs = dict(antialias=antialias, torch_dtype=torch_dtype)
  w_h = bicubic_matrix(in_h, out_h, scale_factor=scale_h, **kwargs)
  w_w = bicubic_matrix(in_w, out_w, scale_factor=scale_w, **kwargs)

  y = x.astype(compute_dtype)
  precision = jax.lax.Precision.HIGHEST

  def apply_h(v):
    if w_h.shape[0] == w_h.shape[1] and np.array_equal(w_h, np.eye(in_h)):
      return v
    return jnp.einsum("oh,...hwc->...owc", jnp.asarray(w_h, compute_dtype), v, precision=precision)

  def apply_w(v):
    if w_w.shape[0] == w_w.shape[1] and np.array_equal(w_w, np.eye(in_w)):
      return v
    return jnp.einsum("ow,...hwc->...hoc", jnp.asarray(w_w, compute_dtype), v, precision=precision)

  # Contract the axis that shrinks the intermediate most first; the result is the same.
  if out_h * in_w <= in_h * out_w:
    y = apply_w(apply_h(y))
  else:
    y = apply_h(apply_w(y))
  return y.astype(x.dtype)


def resize_pos_grid(
  grid: jax.Array,
  out_hw: tuple[int, int],
  *,
  interpolate_offset: float,
  antialias: bool,
  torch_dtype: str | None = None,
) -> jax.Array:
  """Resizes a DINOv2 position-embedding grid as the checkpoint's own code does.

  Args:
    grid: `[M, M', D]` patch position embeddings (CLS entry removed) laid out as a grid.
    out_hw: `(h, w)` patch grid of the input image.
    interpolate_offset: DINOv2's `interpolate_offset`. `> 0`: the original scale-factor rule,
      `scale = (out + offset) / in` per axis (facebookresearch/dinov2, default 0.1); `0`: the
      size rule (register checkpoints, HF transformers).
    antialias: DINOv2's `interpolate_antialias` (True for register checkpoints).
    torch_dtype: see `resize_bicubic`; DINOv2 and HF interpolate in float32, the default.

  Returns:
    `[h, w, D]`; `grid` itself when `out_hw` already equals its size, as DINOv2 skips the
    interpolation then.

  facebookresearch/dinov2 names the image axes `B, nc, w, h = x.shape`, so its `(sx, sy)` and
  `(w0, h0)` are in fact (rows, columns): per-axis `(out_h, out_w)` here is the same mapping.
  """
  if grid.ndim != 3:
    raise ValueError(f"resize_pos_grid: expected a [M, M', D] grid, got shape {grid.shape}.")
  in_h, in_w = grid.shape[0], grid.shape[1]
  out_h, out_w = (int(s) for s in out_hw)
  if (out_h, out_w) == (in_h, in_w):
    return grid
  if interpolate_offset < 0:
    raise ValueError(f"resize_pos_grid: interpolate_offset must be >= 0, got {interpolate_offset}.")
  scale_factor = None
  if interpolate_offset > 0:
    # Same expression as DINOv2 (`float(w0 + offset) / M`), so the double rounds identically.
    scale_factor = (
      float(out_h + interpolate_offset) / in_h,
      float(out_w + interpolate_offset) / in_w,
    )
  return resize_bicubic(
    grid, (out_h, out_w), scale_factor=scale_factor, antialias=antialias, torch_dtype=torch_dtype
  )
