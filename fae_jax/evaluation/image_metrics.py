"""Pixel-space reconstruction metrics: PSNR and SSIM, one value per image.

Inputs are NHWC images (`[B, H, W, C]`, or `[H, W, C]` for one image) on the scale
`[0, data_range]`: uint8 images with the default `data_range=255`, or floats on the same scale
(e.g. `[0, 1]` with `data_range=1`). Model outputs in `[-1, 1]` should go through
`grids.to_uint8` first, so the metric sees the quantised image that is saved and shown; SSIM's
luminance term is not shift invariant, so `[-1, 1]` floats must not be passed as they are.

The reported number for a set is the mean of the per-image values (`reconstruction_metrics`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Wang, Bovik, Sheikh, Simoncelli (2004), "Image quality assessment: from error visibility to
# structural similarity": 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# ITU-R BT.601 luma weights, as MATLAB's rgb2gray (the reference SSIM code runs on grayscale).
_LUMA = np.array([0.299, 0.587, 0.114])


def _as_batch(x: np.ndarray | jax.Array, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4:
    raise ValueError(f"{name}: expected images [B, H, W, C] or [H, W, C], got shape {x.shape}.")
  return x


def _check_pair(a: np.ndarray, b: np.ndarray, name: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name}: image shapes differ, {a.shape} vs {b.shape}.")


def psnr(
  a: np.ndarray | jax.Array, b: np.ndarray | jax.Array, *, data_range: float = 255.0
) -> np.ndarray:
  """Peak signal-to-noise ratio per image, in dB: `[B, H, W, C] x2 -> [B]` float64.

  `10 log10(data_range^2 / mse)`, the mean squared error over all pixels and channels of one
  image, computed in float64. Identical images give `inf`.
  """
  a = _as_batch(a, "psnr").astype(np.float64)
  b = _as_batch(b, "psnr").astype(np.float64)
  _check_pair(a, b, "psnr")
  mse = np.mean(np.square(a - b), axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(float(data_range) ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Normalised 1-D Gaussian taps `[size]`; the 2-D window is their outer product."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(r**2) / (2.0 * sigma**2))
  return g / g.sum()


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim_batch(a: jax.Array, b: jax.Array, taps: jax.Array, *, data_range: float) -> jax.Array:
  """Mean SSIM per image over the valid region and all channels: `[B, H, W, C] x2 -> [B]`."""
  # Variances are local E[x^2] - E[x]^2, which cancels badly in float32 when pixels are large;
  # shifting each image-channel by its mean leaves (co)variances unchanged and shrinks the
  # numbers. The local means need the unshifted images (the luminance term is not shift
  # invariant), so they are added back from the same filter.
  shift = jnp.mean(a, axis=(1, 2), keepdims=True)
  a0, b0 = a - shift, b - shift
  stacked = jnp.concatenate([a0, b0, a0 * a0, b0 * b0, a0 * b0], axis=-1)  # [B, H, W, 5C]
  groups = stacked.shape[-1]
  # Separable depthwise filter: 11 taps down, then 11 across; 'VALID' like the reference code.
  k_h = jnp.broadcast_to(taps[:, None, None, None], (taps.shape[0], 1, 1, groups))
  k_w = jnp.broadcast_to(taps[None, :, None, None], (1, taps.shape[0], 1, groups))
  dn = ("NHWC", "HWIO", "NHWC")
  hp = jax.lax.Precision.HIGHEST  # TPU convs default to bfloat16 passes
  f = jax.lax.conv_general_dilated(
    stacked, k_h, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=groups, precision=hp
  )
  f = jax.lax.conv_general_dilated(
    f, k_w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=groups, precision=hp
  )
  mu_a0, mu_b0, e_aa, e_bb, e_ab = jnp.split(f, 5, axis=-1)
  var_a = e_aa - mu_a0 * mu_a0
  var_b = e_bb - mu_b0 * mu_b0
  cov_ab = e_ab - mu_a0 * mu_b0
  mu_a = mu_a0 + shift
  mu_b = mu_b0 + shift
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov_ab + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def ssim(
  a: np.ndarray | jax.Array,
  b: np.ndarray | jax.Array,
  *,
  data_range: float = 255.0,
  luminance: bool = False,
) -> np.ndarray:
  """Structural similarity per image (Wang et al. 2004): `[B, H, W, C] x2 -> [B]` float64.

  Gaussian-weighted local statistics (11x11 window, sigma 1.5, population (co)variances),
  K1 = 0.01, K2 = 0.03, constants scaled by `data_range`; the SSIM map is computed where the
  window fits entirely inside the image ('valid', as the authors' MATLAB code) and averaged over
  positions and channels. With `luminance=True` an RGB image is first reduced to BT.601 luma
  (the authors' grayscale protocol); otherwise every channel is scored and the mean taken.

  Runs in float32 under `jax.jit` (the images are shifted by their mean first so the local
  variances keep their precision); agrees with a float64 reference to ~1e-6.

  Args:
    a: reference images `[B, H, W, C]` (or `[H, W, C]`) on `[0, data_range]`; H, W >= 11.
    b: distorted images, same shape.
    data_range: value span of the pixels (255 for uint8).
    luminance: score BT.601 luma (needs C == 3) instead of every channel.

  Returns:
    `[B]` SSIM values (1 for identical images).
  """
  a = _as_batch(a, "ssim").astype(np.float32)
  b = _as_batch(b, "ssim").astype(np.float32)
  _check_pair(a, b, "ssim")
  if min(a.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(
      f"ssim: images {a.shape[1:3]} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window; "
      "upscale them or compare at a larger size."
    )
  if luminance:
    if a.shape[-1] != 3:
      raise ValueError(f"ssim: luminance=True needs RGB images, got {a.shape[-1]} channels.")
    luma = _LUMA.astype(np.float32)
    a = (a @ luma)[..., None]
    b = (b @ luma)[..., None]
  taps = jnp.asarray(gaussian_window(), jnp.float32)
  out = _ssim_batch(jnp.asarray(a), jnp.asarray(b), taps, data_range=float(data_range))
  return np.asarray(out, np.float64)


def reconstruction_metrics(
  originals: np.ndarray | jax.Array,
  recons: np.ndarray | jax.Array,
  *,
  data_range: float = 255.0,
) -> dict[str, float]:
  """Mean per-image PSNR and SSIM of reconstructions: `{'psnr': dB, 'ssim': ...}`.

  Images whose PSNR is infinite (exact reconstructions) would make the mean infinite; they are
  kept, as hiding them would overstate the error, and show up as `inf` in the report.
  """
  return {
    "psnr": float(np.mean(psnr(originals, recons, data_range=data_range))),
    "ssim": float(np.mean(ssim(originals, recons, data_range=data_range))),
  }
