"""PSNR and SSIM against direct float64 references."""

import numpy as np
import pytest
import scipy.ndimage
from numpy.lib.stride_tricks import sliding_window_view

from fae_jax.evaluation import image_metrics


def _ssim_reference(a, b, data_range=255.0):
  """Wang et al. (2004) SSIM of one [H, W] channel: full 11x11 Gaussian window, 'valid' map."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  r = np.arange(11) - 5.0
  g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
  w = g / g.sum()

  def filt(x):  # direct 2-D window sum, no separability
    return np.einsum("ijkl,kl->ij", sliding_window_view(x, (11, 11)), w)

  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a**2
  var_b = filt(b * b) - mu_b**2
  cov = filt(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
    (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  )
  return ssim_map.mean()


def _ssim_reference_batch(a, b, data_range=255.0):
  return np.array(
    [
      np.mean([_ssim_reference(a[i, ..., c], b[i, ..., c], data_range) for c in range(a.shape[-1])])
      for i in range(a.shape[0])
    ]
  )


def _test_images(seed=0, shape=(3, 24, 29, 3)):
  rng = np.random.default_rng(seed)
  # Smooth structure plus texture, so the SSIM map is not constant.
  base = scipy.ndimage.gaussian_filter(rng.uniform(0, 255, shape), sigma=(0, 2, 2, 0))
  a = np.clip(base * 2 - 100 + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
  b = np.clip(a + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
  return a, b


def test_ssim_matches_direct_reference():
  a, b = _test_images()
  got = image_metrics.ssim(a, b)
  want = _ssim_reference_batch(a, b)
  assert got.shape == (3,)
  assert np.all(want < 0.99)  # a real distortion, not a trivial match
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_ssim_reference_agrees_with_gaussian_filter():
  # Cross-check the reference itself: scipy's Gaussian with truncate=5/1.5 is the same 11 taps.
  a, b = _test_images(seed=1, shape=(1, 20, 20, 1))
  a, b = a[0, ..., 0].astype(np.float64), b[0, ..., 0].astype(np.float64)

  def filt(x):
    return scipy.ndimage.gaussian_filter(x, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]

  mu_a, mu_b = filt(a), filt(b)
  va, vb, cab = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
  c1, c2 = 2.55**2, 7.65**2
  m = ((2 * mu_a * mu_b + c1) * (2 * cab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
  np.testing.assert_allclose(m.mean(), _ssim_reference(a, b), atol=1e-10)


def test_ssim_float_inputs_bright_flat_regions():
  # Bright, nearly flat images are where float32 E[x^2] - E[x]^2 loses precision.
  rng = np.random.default_rng(2)
  a = 250.0 + rng.normal(0, 1.0, (2, 16, 16, 3))
  a[:, :, :8] = 3.0 + rng.normal(0, 1.0, (2, 16, 8, 3))
  b = a + rng.normal(0, 1.0, a.shape)
  np.testing.assert_allclose(image_metrics.ssim(a, b), _ssim_reference_batch(a, b), atol=1e-5)
  # The same on a [0, 1] scale with data_range=1 is the same number.
  np.testing.assert_allclose(
    image_metrics.ssim(a / 255, b / 255, data_range=1.0), image_metrics.ssim(a, b), atol=1e-5
  )


def test_ssim_identity_and_luminance():
  a, b = _test_images(seed=3, shape=(2, 16, 16, 3))
  np.testing.assert_allclose(image_metrics.ssim(a, a), 1.0, atol=1e-6)
  luma = lambda x: x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
  want = [_ssim_reference(luma(a[i]), luma(b[i])) for i in range(2)]
  np.testing.assert_allclose(image_metrics.ssim(a, b, luminance=True), want, atol=1e-5)
  # A single [H, W, C] image is a batch of one.
  np.testing.assert_allclose(image_metrics.ssim(a[0], b[0]), image_metrics.ssim(a, b)[:1])
  with pytest.raises(ValueError, match="window"):
    image_metrics.ssim(a[:, :8, :8], b[:, :8, :8])


def test_psnr_known_noise():
  rng = np.random.default_rng(4)
  a = rng.integers(20, 236, size=(4, 12, 12, 3)).astype(np.uint8)
  # Exactly +-d on every pixel: mse = d^2, so PSNR = 10 log10(255^2 / d^2) = 20 log10(255 / d).
  d = np.array([1, 2, 5, 10], np.int16)[:, None, None, None]
  sign = rng.choice([-1, 1], size=a.shape)
  b = (a.astype(np.int16) + sign * d).astype(np.uint8)
  got = image_metrics.psnr(a, b)
  np.testing.assert_allclose(got, 20 * np.log10(255.0 / d.ravel()), rtol=1e-12)
  mse = np.mean((a.astype(np.float64) - b) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(got, 10 * np.log10(255.0**2 / mse), rtol=1e-12)
  np.testing.assert_allclose(
    image_metrics.psnr(a / 255.0, b / 255.0, data_range=1.0), got, rtol=1e-10
  )
  assert np.isinf(image_metrics.psnr(a, a)).all()


def test_reconstruction_metrics_are_means():
  a, b = _test_images(seed=5, shape=(3, 16, 16, 3))
  m = image_metrics.reconstruction_metrics(a, b)
  np.testing.assert_allclose(m["psnr"], image_metrics.psnr(a, b).mean())
  np.testing.assert_allclose(m["ssim"], image_metrics.ssim(a, b).mean())
  with pytest.raises(ValueError, match="differ"):
    image_metrics.psnr(a, b[:, :8])
