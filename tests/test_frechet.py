"""Frechet distance: closed forms, an independent scipy computation, streaming stats, npz files."""

import numpy as np
import pytest
import scipy.linalg

from fae_jax.evaluation import frechet
from fae_jax.evaluation.frechet import FeatureStats, StatsAccumulator, frechet_distance


def _random_spd(rng, d, cond_floor=0.5):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + cond_floor * np.eye(d)


def test_one_dimensional_closed_form():
  a = FeatureStats(mean=[1.5], cov=[[4.0]])  # sd 2
  b = FeatureStats(mean=[-0.5], cov=[[0.25]])  # sd 0.5
  np.testing.assert_allclose(
    frechet_distance(a, b), (1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rtol=1e-12
  )


def test_commuting_diagonal_covariances():
  rng = np.random.default_rng(0)
  d = 7
  va, vb = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  ma, mb = rng.normal(size=d), rng.normal(size=d)
  # Diagonal covariances commute: the trace term is sum (sqrt(va) - sqrt(vb))^2.
  expected = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
  got = frechet_distance(FeatureStats(ma, np.diag(va)), FeatureStats(mb, np.diag(vb)))
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  # A shared rotation keeps them commuting and leaves the distance unchanged.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  rotated = frechet_distance(
    FeatureStats(q @ ma, q @ np.diag(va) @ q.T), FeatureStats(q @ mb, q @ np.diag(vb) @ q.T)
  )
  np.testing.assert_allclose(rotated, expected, rtol=1e-9)


def test_identity_and_symmetry():
  rng = np.random.default_rng(1)
  d = 16
  a = FeatureStats(rng.normal(size=d), _random_spd(rng, d))
  b = FeatureStats(rng.normal(size=d), _random_spd(rng, d))
  assert abs(frechet_distance(a, a)) <= 1e-8
  fd_ab, fd_ba = frechet_distance(a, b), frechet_distance(b, a)
  assert fd_ab > 0
  np.testing.assert_allclose(fd_ab, fd_ba, rtol=1e-10)


def test_matches_independent_scipy_sqrtm():
  rng = np.random.default_rng(2)
  d = 24
  a = FeatureStats(rng.normal(size=d), _random_spd(rng, d))
  b = FeatureStats(rng.normal(size=d) * 0.3, _random_spd(rng, d))
  # The textbook formula with a general (non-symmetric) matrix square root of S_a S_b.
  covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
  covmean = np.real(covmean)
  expected = (
    np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(covmean)
  )
  np.testing.assert_allclose(frechet_distance(a, b), expected, rtol=1e-6, atol=1e-6)


def test_rank_deficient_covariances_are_finite():
  rng = np.random.default_rng(3)
  d, n = 32, 10  # fewer samples than dimensions: rank <= 9
  a = FeatureStats.from_features(rng.normal(size=(n, d)))
  b = FeatureStats.from_features(rng.normal(size=(n, d)) + 0.5)
  assert np.linalg.matrix_rank(a.cov) < d
  fd = frechet_distance(a, b)
  assert np.isfinite(fd) and fd >= 0
  assert 0.0 <= frechet_distance(a, a) <= 1e-6


def test_from_features_matches_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(50, 6)).astype(np.float32)
  stats = FeatureStats.from_features(x)
  assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64 and stats.count == 50
  np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_streaming_equals_one_shot():
  rng = np.random.default_rng(5)
  # A large common offset: summing raw x x^T in float32 would lose the small variances.
  x = rng.normal(size=(203, 5)) * np.array([1e-2, 1.0, 3.0, 0.1, 1.0]) + 1e4
  acc = StatsAccumulator()
  for start, stop in [(0, 1), (1, 64), (64, 64), (64, 150), (150, 203)]:
    acc.update(x[start:stop])
  streamed, one_shot = acc.finalize(), FeatureStats.from_features(x)
  assert streamed.count == one_shot.count == 203
  np.testing.assert_allclose(streamed.mean, one_shot.mean, rtol=1e-13)
  np.testing.assert_allclose(streamed.cov, one_shot.cov, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(one_shot.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_accumulator_errors():
  acc = StatsAccumulator()
  acc.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    acc.finalize()
  with pytest.raises(ValueError, match="feature dim"):
    acc.update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match="NaN"):
    acc.update(np.full((2, 3), np.nan))
  with pytest.raises(ValueError, match="dims differ"):
    frechet_distance(FeatureStats([0.0], [[1.0]]), FeatureStats([0.0, 0.0], np.eye(2)))


def test_npz_round_trip_and_adm_layout(tmp_path):
  rng = np.random.default_rng(6)
  stats = FeatureStats.from_features(rng.normal(size=(20, 4)))
  path = tmp_path / "sub" / "ref.npz"
  stats.save_npz(path)
  assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temp file left
  with np.load(path) as data:
    np.testing.assert_array_equal(data["mu"], stats.mean)
    np.testing.assert_array_equal(data["sigma"], stats.cov)
  back = FeatureStats.load_npz(path)
  np.testing.assert_array_equal(back.mean, stats.mean)
  np.testing.assert_array_equal(back.cov, stats.cov)
  assert back.count == 20
  # An ADM reference batch: images plus mu/sigma (and spatial stats); no count.
  adm = tmp_path / "VIRTUAL_ref.npz"
  np.savez(
    adm,
    arr_0=np.zeros((2, 8, 8, 3), np.uint8),
    mu=stats.mean,
    sigma=stats.cov,
    mu_s=np.zeros(3),
    sigma_s=np.eye(3),
  )
  ref = FeatureStats.load_npz(adm)
  assert ref.count is None
  assert frechet_distance(ref, stats) <= 1e-8
  bad = tmp_path / "bad.npz"
  np.savez(bad, mean=stats.mean)
  with pytest.raises(ValueError, match="lacks key"):
    FeatureStats.load_npz(bad)


def test_fd_features_pooling():
  rng = np.random.default_rng(7)
  tokens = rng.normal(size=(3, 5, 4)).astype(np.float32)  # CLS + 4 patches
  np.testing.assert_allclose(
    np.asarray(frechet.fd_features(tokens, pool="cls", num_prefix_tokens=1)), tokens[:, 0]
  )
  np.testing.assert_allclose(
    np.asarray(frechet.fd_features(tokens, num_prefix_tokens=1)),
    tokens[:, 1:].mean(1),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(frechet.fd_features(tokens)), tokens.mean(1), rtol=1e-6, atol=1e-7
  )
  np.testing.assert_allclose(
    np.asarray(frechet.fd_features(tokens[:, 0], pool="cls")), tokens[:, 0]
  )
  with pytest.raises(ValueError, match="CLS"):
    frechet.fd_features(tokens, pool="cls")
  with pytest.raises(ValueError, match="mean_patch"):
    frechet.fd_features(tokens[:, 0])
