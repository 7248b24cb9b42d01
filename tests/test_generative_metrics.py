"""FID, sFID, Inception Score and improved precision/recall (fae_jax.evaluation.generative)."""

import numpy as np
import pytest
import scipy.linalg

from fae_jax.evaluation import generative


def features_with_moments(rng, n, mean, cov):
  """`[n, D]` features whose sample mean is `mean` and unbiased sample covariance is `cov`."""
  d = mean.shape[0]
  z = rng.normal(size=(n, d))
  z -= z.mean(axis=0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
  return z @ np.linalg.cholesky(cov).T + mean


def test_fid_of_features_equals_closed_form_for_known_gaussians():
  rng = np.random.default_rng(0)
  d = 6
  mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
  var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.1, 3.0, d)
  a = features_with_moments(rng, 64, mu_a, np.diag(var_a))
  b = features_with_moments(rng, 80, mu_b, np.diag(var_b))
  # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2.
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  assert generative.fid(a, b) == pytest.approx(expected, rel=1e-9)
  # Full covariances: the ADM evaluator's formula (scipy sqrtm of the product) as the oracle.
  m = rng.normal(size=(d, d))
  cov_a, cov_b = m @ m.T + 0.1 * np.eye(d), np.cov(rng.normal(size=(30, d)), rowvar=False)
  a = features_with_moments(rng, 50, mu_a, cov_a)
  b = features_with_moments(rng, 50, mu_b, cov_b)
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
  adm = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
  assert generative.fid(a, b) == pytest.approx(adm, rel=1e-8)
  assert generative.fid(a, a) == pytest.approx(0.0, abs=1e-9)


def adm_inception_score(logits, split_size):
  """The ADM evaluator's formula, with a float64 softmax."""
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  preds = e / e.sum(axis=1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i : i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_inception_score_matches_adm_formula():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(23, 10)) * 3.0
  for split in (5, 23, 5000):
    assert generative.inception_score(logits, split) == pytest.approx(
      adm_inception_score(logits, split), rel=1e-12
    )
  # Confident and uniformly spread over C classes: IS = C; identical predictions: IS = 1.
  c = 7
  confident = np.tile(60.0 * np.eye(c), (3, 1))
  assert generative.inception_score(confident) == pytest.approx(c, rel=1e-9)
  assert generative.inception_score(np.tile(logits[:1], (9, 1))) == pytest.approx(1.0, abs=1e-12)
  # 50K samples are 10 splits of 5000: the default split equals an explicit one.
  big = rng.normal(size=(10_000, 4))
  assert generative.inception_score(big) == pytest.approx(adm_inception_score(big, 5000))


def brute_force_precision_recall(real, fake, k):
  def sq(u, v):
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

  r_real = np.sort(sq(real, real), axis=1)[:, k]
  r_fake = np.sort(sq(fake, fake), axis=1)[:, k]
  d = sq(real, fake)
  precision = np.mean(np.any(d <= r_real[:, None], axis=0))
  recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
  return float(precision), float(recall), r_real, r_fake


@pytest.fixture(scope="module")
def point_sets():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(40, 8)).astype(np.float32)
  fake = (rng.normal(size=(37, 8)) * 0.8 + 0.7).astype(np.float32)
  return real, fake


@pytest.mark.parametrize("block_size", [7, 16, 1000])
def test_precision_recall_equals_brute_force(point_sets, block_size):
  real, fake = point_sets
  p_ref, r_ref, radii_real, radii_fake = brute_force_precision_recall(
    real.astype(np.float64), fake.astype(np.float64), 3
  )
  assert 0.05 < p_ref < 0.95 and 0.05 < r_ref < 0.95  # a test that can fail either way
  np.testing.assert_allclose(
    generative.knn_radii(real, 3, block_size=block_size), radii_real, rtol=1e-5
  )
  np.testing.assert_allclose(
    generative.knn_radii(fake, 3, block_size=block_size), radii_fake, rtol=1e-5
  )
  assert generative.precision_recall(real, fake, block_size=block_size) == (p_ref, r_ref)


def test_precision_recall_identical_and_disjoint_sets(point_sets):
  real, fake = point_sets
  assert generative.precision_recall(real, real.copy(), block_size=16) == (1.0, 1.0)
  assert generative.precision_recall(real, real + 100.0, block_size=16) == (0.0, 0.0)
  assert generative.precision_recall(fake, fake[::-1].copy()) == (1.0, 1.0)


def test_row_blocks_split_over_processes_equal_the_whole(point_sets):
  real, fake = point_sets
  block, count = 7, 3
  full = generative.knn_radii(real, 3, block_size=block)
  parts = [
    generative.knn_radii(
      real,
      3,
      block_size=block,
      row_blocks=generative.process_row_blocks(len(real), block, index, count),
    )
    for index in range(count)
  ]
  assert all(np.isinf(p).any() for p in parts)  # each process leaves other rows untouched
  np.testing.assert_array_equal(np.minimum.reduce(parts), full)

  r_real, r_fake = full, generative.knn_radii(fake, 3, block_size=block)
  whole = generative.manifold_membership(real, r_real, fake, r_fake, block_size=block)
  split = [
    generative.manifold_membership(
      real,
      r_real,
      fake,
      r_fake,
      block_size=block,
      row_blocks=generative.process_row_blocks(len(real), block, index, count),
    )
    for index in range(count)
  ]
  np.testing.assert_array_equal(np.logical_or.reduce([s[0] for s in split]), whole[0])
  np.testing.assert_array_equal(np.logical_or.reduce([s[1] for s in split]), whole[1])
  assert sorted(
    b for i in range(count) for b in generative.process_row_blocks(40, 7, i, count)
  ) == (list(range(6)))


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="N >= 4"):
    generative.precision_recall(np.zeros((3, 2)), np.zeros((9, 2)))
  with pytest.raises(ValueError, match="NaN"):
    generative.knn_radii(np.full((9, 2), np.nan))
  with pytest.raises(ValueError, match="logits"):
    generative.inception_score(np.zeros((4,)))
