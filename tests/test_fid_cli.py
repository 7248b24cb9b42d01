"""`python -m fae_jax.fid` end to end: random-weight Inception export, tiny random batches."""

import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from inception_weights import write_random_export

from fae_jax import fid
from fae_jax.convert.inception import load_inception
from fae_jax.evaluation import adm_npz, generative
from fae_jax.evaluation.frechet import FeatureStats
from fae_jax.models.inception import FIDInceptionV3


def _parse(text):
  rows = dict(line.split(": ", 1) for line in text.strip().splitlines())
  assert list(rows) == list(fid.ROWS)
  return rows


def _brute_force_pr(real, fake, k=3):
  def sq(u, v):
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

  r_real = np.sort(sq(real, real), axis=1)[:, k]
  r_fake = np.sort(sq(fake, fake), axis=1)[:, k]
  d = sq(real, fake)
  return np.mean(np.any(d <= r_real[:, None], axis=0)), np.mean(np.any(d <= r_fake[None], axis=1))


def gram_frechet_distance(a, b):
  """FD of two small sets (N << D) through their [Na, Nb] cross-Gram matrix.

  With centred X_a, X_b and S = X^T X / (N - 1), the nonzero eigenvalues of S_a S_b are the
  squared singular values of X_a X_b^T / sqrt((Na - 1)(Nb - 1)), so
  tr((S_a S_b)^{1/2}) is the sum of those singular values: no D x D matrix function at all.
  """
  xa, xb = a - a.mean(axis=0), b - b.mean(axis=0)
  scale = np.sqrt((len(a) - 1) * (len(b) - 1))
  tr_sqrt = np.linalg.svd(xa @ xb.T / scale, compute_uv=False).sum()
  diff = a.mean(axis=0) - b.mean(axis=0)
  tr_a = (xa**2).sum() / (len(a) - 1)
  tr_b = (xb**2).sum() / (len(b) - 1)
  return diff @ diff + tr_a + tr_b - 2 * tr_sqrt


def test_fid_command_prints_the_adm_table(tmp_path, capsys):
  export = write_random_export(tmp_path)
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  ref_images = (rng.integers(0, 256, (7, 32, 32, 3)) // 2 + 40).astype(np.uint8)
  samples_path, ref_path = tmp_path / "samples.npz", tmp_path / "ref.npz"
  adm_npz.write_samples(samples_path, samples)
  np.savez(ref_path, arr_0=ref_images)  # a reference batch with images only: stats computed

  # 10 samples in calls of 8 (batch 4 rounds up to the 8 fake devices): 8 + 2, padded.
  with flagsaver.flagsaver(
    samples=str(samples_path), ref=str(ref_path), inception_dir=str(export), batch_size=4
  ):
    fid.main(["fid"])
  table = _parse(capsys.readouterr().out)

  # Independent path: one unbatched, unpadded forward pass; ADM's np.mean / np.cov statistics.
  params, _ = load_inception(export)
  out = jax.jit(lambda p, x: FIDInceptionV3().apply({"params": p}, x))(
    params, np.concatenate([samples, ref_images])
  )
  out = {k: np.asarray(v, np.float64) for k, v in out.items()}
  s = {k: v[:10] for k, v in out.items()}
  r = {k: v[10:] for k, v in out.items()}

  def stats(x):
    return FeatureStats(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False))

  expected = {
    "Inception Score": generative.inception_score(s["logits_unbiased"]),
    "FID": gram_frechet_distance(s["pool3"], r["pool3"]),
    "sFID": gram_frechet_distance(s["spatial"], r["spatial"]),
  }
  assert expected["FID"] > 1.0 and expected["Inception Score"] > 1.0
  for name, value in expected.items():
    assert float(table[name]) == pytest.approx(value, rel=1e-4), name
  precision, recall = _brute_force_pr(r["pool3"], s["pool3"])
  assert (float(table["Precision"]), float(table["Recall"])) == (precision, recall)

  # A statistics-only reference (mu, sigma, mu_s, sigma_s): same FID/sFID, no precision/recall.
  stats_path = tmp_path / "ref_stats.npz"
  adm_npz.write_reference(
    stats_path, adm_npz.ReferenceStats(stats(r["pool3"]), stats(r["spatial"]))
  )
  result = fid.evaluate_batches(samples_path, stats_path, export, batch_size=8)
  assert result["FID"] == pytest.approx(expected["FID"], rel=1e-4)
  assert result["sFID"] == pytest.approx(expected["sFID"], rel=1e-4)
  assert result["Precision"] is None and "n/a" in fid.format_table(result)


def test_fid_command_errors(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  samples = tmp_path / "s.npz"
  adm_npz.write_samples(samples, images)
  with pytest.raises(FileNotFoundError, match="--ref=.*missing.npz"):
    fid.evaluate_batches(samples, tmp_path / "missing.npz", tmp_path)
  empty_ref = tmp_path / "r.npz"
  np.savez(empty_ref, labels=np.zeros(3))
  with pytest.raises(KeyError, match="neither the statistics"):
    fid.evaluate_batches(samples, empty_ref, tmp_path)
  no_images = tmp_path / "no_images.npz"
  np.savez(no_images, arr_1=np.zeros(3))
  with pytest.raises(KeyError, match="no 'arr_0' array"):
    fid.evaluate_batches(no_images, samples, tmp_path)
  with pytest.raises(FileNotFoundError, match="inception.json missing"):
    fid.evaluate_batches(samples, samples, tmp_path / "no_export")
