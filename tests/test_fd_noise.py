"""launch/fd_noise.py: the FD of a run's sample shards against its held-out shards, and the
bootstrap spread that says which sweep differences are noise."""

from __future__ import annotations

import os
import sys

import numpy as np

from fae_jax.evaluation import frechet, sample_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import fd_noise  # noqa: E402


def _write(directory, key, feats, shard_size=50):
  for j in range(sample_shards.num_shards(len(feats), shard_size)):
    start, stop = sample_shards.shard_range(j, len(feats), shard_size)
    sample_shards.write_shard(
      sample_shards.shard_path(directory, j),
      {key: feats[start:stop], sample_shards.INDEX_KEY: np.arange(start, stop)},
    )


def test_fd_and_bootstrap_spread_from_shards(tmp_path, capsys, monkeypatch):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(200, 4))
  fake = rng.normal(loc=0.5, size=(200, 4))
  _write(tmp_path / "eval" / "held_out", "real", real)
  _write(tmp_path / "eval" / "diffusion_guided", "dinov2", fake)
  got_real = fd_noise._features(str(tmp_path / "eval" / "held_out"), "real")
  np.testing.assert_array_equal(got_real, real)  # shards read back in order
  want = float(
    frechet.frechet_distance(
      frechet.FeatureStats.from_features(real), frechet.FeatureStats.from_features(fake)
    )
  )
  assert abs(fd_noise.fd(real, fake) - want) < 1e-9
  # The mean shift alone contributes 4 * 0.5^2 = 1: the FD is near it, the spread well below it.
  spread = fd_noise.bootstrap(real, fake, resamples=30)
  assert 0.0 < spread.std() < 0.5 * want and 0.7 < want < 1.6
  # The same set against itself: FD 0, while its resamples are not (the noise floor).
  assert abs(fd_noise.fd(real, real)) < 1e-9
  monkeypatch.setattr(sys, "argv", ["fd_noise.py", str(tmp_path), "--resamples=5"])
  fd_noise.main()
  out = capsys.readouterr().out
  assert "| diffusion_guided | " in out and "held_out |" not in out
