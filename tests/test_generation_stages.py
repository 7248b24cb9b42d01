"""latents -> diffusion -> evaluate on tiny shapes, after convert/encode/fae/pixel."""

import json

import numpy as np
import pytest
from etils import epath

from configs import demo, imagenet
from fae_jax import main
from fae_jax.data import array_cache
from fae_jax.models.dinov2 import Dinov2Config
from fae_jax.stages import diffusion, evaluate, latents

SMALL = Dinov2Config(width=32, depth=1, num_heads=2, pos_grid=4, interpolate_offset=0.0)


def tiny_config():
  config = demo.get_config("random_encoder,tiny")
  config.stages = ("convert", "encode", "fae", "pixel", "latents", "diffusion", "evaluate")
  config.data.name = "synthetic"
  config.data.num_examples = 48
  config.data.num_classes = 4
  config.data.synthetic_image_size = 28
  config.data.max_train_examples = 32
  config.data.max_eval_examples = 16
  config.encoder.image_size = 28  # 2 x 2 tokens
  config.encode.examples_per_shard = 16
  config.encode.batch_size = 16
  config.latents.flip = True  # exercise the image path with flips (the demo turns flips off)
  m = config.fae.model
  m.latent_dim = 4
  m.adapter_heads, m.adapter_head_dim = 2, 16
  m.decoder_depth, m.decoder_width, m.decoder_heads, m.decoder_head_dim = 1, 32, 2, 16
  config.fae.train.num_steps, config.fae.train.batch_size = 3, 8
  config.fae.eval.batch_size, config.fae.eval.probe_steps = 8, 10
  config.pixel.model.patch_size = 14  # 2 x 2 tokens x 14 px = 28 px
  dm = config.diffusion.model
  config.diffusion.objective.timestep_shift = 0.4  # the paper's value: s = 2.5
  dm.variant = "S/1"
  dm.width, dm.depth, dm.num_heads = 32, 1, 2
  t = config.diffusion.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 4, 8, 2, 2
  t.ema_decay = 0.9
  e = config.evaluate
  e.generators = ("diffusion",)  # the demo also evaluates the flow (tests/test_flow_stage.py)
  e.num_samples, e.batch_size, e.probe_train_examples, e.probe_steps = 8, 8, 16, 10
  e.grid_per_class = 2
  e.unguided.num_steps = e.guided.num_steps = 3
  return config


@pytest.fixture
def small_encoder(monkeypatch):
  monkeypatch.setattr(Dinov2Config, "from_variant", classmethod(lambda cls, *a, **k: SMALL))


def test_latents_diffusion_evaluate_end_to_end(tmp_path, small_encoder):
  config = tiny_config()
  # Only these keys need to exist for the stages to be wired; they must not be silently absent.
  for key in ("width", "depth", "num_heads"):
    assert key in config.diffusion.model
  report = main.run_stages(config, epath.Path(tmp_path))

  # latents: posterior mean/std of images and flips, and per-channel statistics.
  src = array_cache.CacheSource(latents.cache_dir(tmp_path))
  assert len(src) == 32 and set(src.spec) >= set(latents.FIELDS)
  rec = src[0]
  assert rec["mean"].shape == (2, 2, 4) and (rec["std"].astype(np.float32) > 0).all()
  assert not np.array_equal(rec["mean"], rec["mean_flip"])
  stats = json.loads((tmp_path / "latents" / "stats.json").read_text())
  assert len(stats["mean"]) == 4 and min(stats["std"]) > 0

  # diffusion: trained, exported with the latent statistics and time shift (ts 0.4 -> s 2.5).
  params, cfg, meta = diffusion.load_export(epath.Path(tmp_path))
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


def test_latents_from_feature_cache_match_the_image_path(tmp_path, small_encoder):
  config = tiny_config()
  config.latents.flip = False  # then the cached features are reused, no encoder pass
  config.stages = ("convert", "encode", "fae", "latents")
  main.run_stages(config, epath.Path(tmp_path))
  src = array_cache.CacheSource(latents.cache_dir(tmp_path))
  assert src.metadata["source"] == "feature_cache" and "mean_flip" not in src.spec
  # The same posteriors from the images (float32 features, not the bfloat16 cache).
  import jax.numpy as jnp

  from fae_jax.data import sources
  from fae_jax.stages import encode
  from fae_jax.stages import fae as fae_stage

  enc_params, spec, _ = encode.load_frozen_encoder(
    type("Ctx", (), {"encoder_dir": tmp_path / "encoder", "config": config})()
  )
  fae_params, fcfg, _ = fae_stage.load_export(tmp_path / "fae" / "export")
  images = np.stack([sources.make_source(config.data, "train")[i]["image"] for i in range(8)])
  fn = latents.make_posterior_fn(spec, fcfg, jnp.float32, flip=False)
  want = np.asarray(fn((enc_params, fae_params), images)["mean"], np.float32)
  got = np.stack([src[i]["mean"] for i in range(8)]).astype(np.float32)
  np.testing.assert_allclose(got, want, atol=0.05, rtol=0.05)
  np.testing.assert_array_equal([src[i]["id"] for i in range(8)], np.arange(8))
