"""latents -> diffusion -> evaluate on tiny shapes, after convert/encode/fae/pixel."""

import json

import numpy as np
import pytest
from etils import epath

from configs import demo, imagenet
from fae_jax import artifacts, main
from fae_jax.data import array_cache, feature_cache
from fae_jax.stages import diffusion, evaluate, latents


@pytest.mark.slow
def test_latents_diffusion_evaluate_end_to_end(tmp_path, small_encoder, tiny_generation_config):
  config = tiny_generation_config()
  # Only these keys need to exist for the stages to be wired; they must not be silently absent.
  for key in ("width", "depth", "num_heads"):
    assert key in config.diffusion.model
  report = main.run_stages(config, epath.Path(tmp_path))

  # latents: posterior mean/std of images and flips, and per-channel statistics.
  src = array_cache.CacheSource(feature_cache.latent_cache_dir(tmp_path))
  assert len(src) == 32 and set(src.spec) >= set(latents.FIELDS)
  rec = src[0]
  assert rec["mean"].shape == (2, 2, 4) and (rec["std"].astype(np.float32) > 0).all()
  assert not np.array_equal(rec["mean"], rec["mean_flip"])
  stats = json.loads((tmp_path / "latents" / "stats.json").read_text())
  assert len(stats["mean"]) == 4 and min(stats["std"]) > 0

  # diffusion: trained, exported with the latent statistics and time shift (ts 0.4 -> s 2.5).
  params, cfg, meta = artifacts.load_export(
    "diffusion", artifacts.export_dir(tmp_path, "diffusion")
  )
  assert cfg.in_channels == 4 and cfg.num_classes == 4 and meta["step"] == 4
  assert meta["time_shift"] == pytest.approx(2.5)
  assert report["diffusion"]["steps"] == 4

  # evaluate: every metric the issue names, finite, and the PNG grids.
  d = report["diffusion"]
  for key in (
    "fd_dinov2_guided",
    "fd_dinov2_unguided",
    "fd_dinov2_untrained",
    "class_consistency_guided",
    "class_consistency_unguided",
  ):
    assert np.isfinite(d[key]), key
  assert 0 <= d["class_consistency_guided"] <= 1
  assert report["real"]["fd_dinov2_floor"] >= 0
  assert epath.Path(d["grid_png"]).exists()
  assert (tmp_path / "eval" / "metrics.json").exists()
  # Rerun: everything complete, nothing recomputed.
  assert main.run_stages(config, epath.Path(tmp_path)) == report


def test_balanced_labels_and_sampler_settings():
  labels = evaluate.balanced_labels(12, 4)
  assert np.bincount(labels).tolist() == [3, 3, 3, 3] and (np.diff(labels) >= 0).all()
  with pytest.raises(ValueError, match="multiple"):
    evaluate.balanced_labels(10, 4)
  s = evaluate.sampler_settings(demo.get_config())
  assert s["unguided"]["bands"] == () and s["guided"]["bands"]


def test_time_shift_accepts_one_form_only():
  config = imagenet.get_config()
  assert diffusion.time_shift(config) == pytest.approx(2.5)
  config.diffusion.objective.timestep_shift = None
  config.diffusion.objective.shift = 3.0
  assert diffusion.time_shift(config) == 3.0
  config.diffusion.objective.timestep_shift = 0.5
  with pytest.raises(ValueError):
    diffusion.time_shift(config)


@pytest.mark.slow
def test_latents_from_feature_cache_match_the_image_path(
  tmp_path, small_encoder, tiny_generation_config
):
  config = tiny_generation_config()
  config.latents.flip = False  # then the cached features are reused, no encoder pass
  config.stages = ("convert", "encode", "fae", "latents")
  main.run_stages(config, epath.Path(tmp_path))
  src = array_cache.CacheSource(feature_cache.latent_cache_dir(tmp_path))
  assert src.metadata["source"] == "feature_cache" and "mean_flip" not in src.spec
  # The same posteriors from the images (float32 features, not the bfloat16 cache).
  import jax.numpy as jnp

  from fae_jax.data import sources

  enc_params, spec, _ = artifacts.load_frozen_encoder(tmp_path / "encoder", config)
  fae_params, fcfg, _ = artifacts.load_export("fae", tmp_path / "fae" / "export")
  images = np.stack([sources.make_source(config.data, "train")[i]["image"] for i in range(8)])
  fn = latents.make_posterior_fn(spec, fcfg, jnp.float32, flip=False)
  want = np.asarray(fn((enc_params, fae_params), images)["mean"], np.float32)
  got = np.stack([src[i]["mean"] for i in range(8)]).astype(np.float32)
  np.testing.assert_allclose(got, want, atol=0.05, rtol=0.05)
  np.testing.assert_array_equal([src[i]["id"] for i in range(8)], np.arange(8))
