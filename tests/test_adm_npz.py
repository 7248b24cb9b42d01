"""ADM evaluator .npz files: round trips, streaming, and statistics against the ADM formulas."""

import numpy as np
import pytest

from fae_jax.evaluation import adm_npz
from fae_jax.evaluation.frechet import FeatureStats


def toy_features(images):
  """A cheap deterministic stand-in for the Inception: pool3 [B, 5], spatial [B, 12]."""
  x = images.astype(np.float32) / 255.0
  pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))[:, :2]], axis=1)
  spatial = x[:, ::4, ::4, :].reshape(len(x), -1)[:, :12] ** 2
  return {"pool3": pool, "spatial": spatial}


def test_samples_round_trip_and_stream(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 1000, 11)
  path = tmp_path / "samples.npz"
  adm_npz.write_samples(path, images, labels)
  assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone after the rename
  with np.load(path) as data:  # what the ADM evaluator reads
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["arr_1"], labels)
  assert adm_npz.image_shape(path) == (11, 8, 6, 3)
  batches = list(adm_npz.iter_images(path, 4))
  assert [len(b) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches), images)
  np.testing.assert_array_equal(adm_npz.read_images(path), images)


def test_reference_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  pool = FeatureStats.from_features(rng.normal(size=(9, 4)))
  spatial = FeatureStats.from_features(rng.normal(size=(9, 3)))
  images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  path = tmp_path / "ref.npz"
  adm_npz.write_reference(path, adm_npz.ReferenceStats(pool, spatial), images)
  assert sorted(adm_npz.keys(path)) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
  back = adm_npz.read_reference(path)
  for ours, theirs in ((back.pool, pool), (back.spatial, spatial)):
    np.testing.assert_array_equal(ours.mean, theirs.mean)
    np.testing.assert_array_equal(ours.cov, theirs.cov)
  np.testing.assert_array_equal(adm_npz.read_images(path), images)


def test_statistics_of_a_batch_file_equal_the_adm_formulas(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
  path = tmp_path / "batch.npz"
  adm_npz.write_samples(path, images)
  acts = adm_npz.batch_activations(path, toy_features, batch_size=5)
  stats = adm_npz.reference_stats_from_activations(acts)
  # The ADM evaluator: one pass over all images, mu = np.mean, sigma = np.cov(rowvar=False).
  with np.load(path) as data:
    oracle = toy_features(data["arr_0"])
  for ours, name in ((stats.pool, "pool3"), (stats.spatial, "spatial")):
    np.testing.assert_allclose(ours.mean, np.mean(oracle[name].astype(np.float64), axis=0))
    np.testing.assert_allclose(ours.cov, np.cov(oracle[name], rowvar=False), rtol=1e-9, atol=1e-12)
    assert ours.count == 23


def test_errors_name_the_file_and_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    adm_npz.read_reference(tmp_path / "nope.npz")
  path = tmp_path / "stats_only.npz"
  np.savez(path, mu=np.zeros(2))
  with pytest.raises(
    KeyError, match=r"lacks the statistics key\(s\) \['sigma', 'mu_s', 'sigma_s'\]"
  ):
    adm_npz.read_reference(path)
  with pytest.raises(KeyError, match="no 'arr_0' array"):
    next(adm_npz.iter_images(path, 2))
  with pytest.raises(ValueError, match="uint8 images"):
    adm_npz.write_samples(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))
  bad = tmp_path / "float.npz"
  np.savez(bad, arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8 images"):
    adm_npz.image_shape(bad)
