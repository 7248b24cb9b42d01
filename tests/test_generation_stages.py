"""latents -> diffusion -> evaluate on tiny shapes, after convert/encode/fae/pixel."""

import json

import numpy as np
import pytest
from etils import epath

from configs import demo, imagenet
from fae_jax import artifacts, fid, main
from fae_jax import report as report_lib
from fae_jax.data import array_cache, feature_cache, sources
from fae_jax.evaluation import adm_npz, generative, linear_probe, sample_shards
from fae_jax.evaluation import generators as eval_generators
from fae_jax.stages import StageContext, diffusion, evaluate, latents


@pytest.mark.slow
def test_latents_diffusion_evaluate_end_to_end(
  tmp_path, small_encoder, tiny_generation_config, monkeypatch
):
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
  check_diagnostics(report, tmp_path)
  check_fid_path_and_one_held_out_set(config, tmp_path, monkeypatch)


def check_diagnostics(report, workdir):
  """Issue 16's table: the floor, both reconstruction paths and the generators, all present."""
  assert 0 <= report["real"]["probe_top1_eval"] <= 1
  for key in (
    "fd_dinov2",
    "class_consistency",
    "precision_dinov2",
    "recall_dinov2",
    "fd_dinov2_noisy",
    "class_consistency_noisy",
  ):
    assert np.isfinite(report["recon"][key]), key
  for setting in ("guided", "unguided"):
    for key in ("precision_dinov2", "recall_dinov2"):
      assert 0 <= report["diffusion"][f"{key}_{setting}"] <= 1
    # The gathered ADM batch equals the concatenation of the shards.
    npz = epath.Path(report["diffusion"][f"samples_npz_{setting}"])
    shards = sample_shards.read_shards(workdir / "eval" / f"diffusion_{setting}", 8, 4, ["arr_0"])
    np.testing.assert_array_equal(adm_npz.read_images(npz), shards["arr_0"])
    np.testing.assert_array_equal(np.load(npz)["arr_1"], evaluate.balanced_labels(8, 4))
  lines = report_lib.summary(report).splitlines()
  for label, value in (
    ("real images (floor", report["real"]["fd_dinov2_floor"]),
    ("reconstructions, noisy-feature path", report["recon"]["fd_dinov2_noisy"]),
    ("reconstructions, full path", report["recon"]["fd_dinov2"]),
    ("diffusion, unguided", report["diffusion"]["fd_dinov2_unguided"]),
    ("diffusion, guided", report["diffusion"]["fd_dinov2_guided"]),
  ):
    assert any(ln.strip().startswith(label) and f"{value:.2f}" in ln for ln in lines), label
  assert any(f"{report['real']['probe_top1_eval']:.3f}" in ln for ln in lines)


def check_fid_path_and_one_held_out_set(config, tmp_path, monkeypatch):
  """Evaluate again with a random-weight Inception export and a reference batch of real images
  (the samples are scored as they are, not drawn again), every figure measured against the
  same held-out features."""
  inception_weights = pytest.importorskip("inception_weights")
  guided_dir = tmp_path / "eval" / "diffusion_guided"
  before = sample_shards.read_shards(guided_dir, 8, 4, ["arr_0"])["arr_0"]
  (tmp_path / "eval" / "metrics.json").unlink()
  (tmp_path / "fid").mkdir()
  export = inception_weights.write_random_export(tmp_path / "fid")
  source = sources.make_source(config.data, "train")
  ref_path = tmp_path / "ref.npz"
  np.savez(ref_path, arr_0=np.stack([source[i]["image"] for i in range(10)]))
  config.evaluate.inception_dir = str(export)
  config.evaluate.reference_npz = str(ref_path)

  calls = {"fd": [], "pr": [], "probe": []}
  fd, pr, probe = evaluate.fd, generative.precision_recall, linear_probe.probe_accuracy
  monkeypatch.setattr(evaluate, "fd", lambda a, b: calls["fd"].append(b) or fd(a, b))

  def record_pr(real, fake, *args, **kwargs):
    calls["pr"].append((real, fake))
    return pr(real, fake, *args, **kwargs)

  monkeypatch.setattr(generative, "precision_recall", record_pr)
  monkeypatch.setattr(
    linear_probe, "probe_accuracy", lambda p, x, y: calls["probe"].append((x, y)) or probe(p, x, y)
  )
  from fae_jax import sharding

  ctx = StageContext(config, epath.Path(tmp_path), sharding.mesh_from_config(config.mesh))
  evaluate.run(ctx)
  report = report_lib.read_report(tmp_path)

  # One held-out array: the floor, both reconstruction paths, both settings and the untrained
  # generator are all FDs against it; DINOv2 precision/recall too (Inception PR uses pool3).
  held = sample_shards.read_shards(tmp_path / "eval" / "held_out", 8, 4, ["real", "label"])
  np.testing.assert_array_equal(held["index"], np.arange(8))
  real = calls["fd"][0]
  assert len(calls["fd"]) == 6 and all(b is real for b in calls["fd"])
  np.testing.assert_array_equal(real, held["real"])
  dinov2_pr = [r for r, _ in calls["pr"] if r.shape[1] == real.shape[1]]
  assert len(dinov2_pr) == 4 and all(r is real for r in dinov2_pr)
  # The probe's ceiling and both reconstructions are scored on the held-out images' labels.
  np.testing.assert_array_equal(calls["probe"][0][0], real)
  for _, y in calls["probe"][:3]:
    np.testing.assert_array_equal(y, held["label"])

  # FID path: the ADM table for each setting equals `python -m fae_jax.fid` on the written npz.
  check_diagnostics(report, tmp_path)
  d = report["diffusion"]
  for setting in ("guided", "unguided"):
    table = fid.evaluate_batches(d[f"samples_npz_{setting}"], ref_path, export, batch_size=8)
    for row, key in zip(fid.ROWS, fid.METRIC_KEYS, strict=True):
      assert d[f"{key}_{setting}"] == pytest.approx(table[row], rel=1e-4), (setting, key)
    assert d[f"fid_{setting}"] > 0 and d[f"inception_score_{setting}"] >= 1
  np.testing.assert_array_equal(
    sample_shards.read_shards(guided_dir, 8, 4, ["arr_0"])["arr_0"], before
  )
  assert any(
    ln.strip().startswith("diffusion, guided") for ln in report_lib.summary(report).split("\n")
  )


def test_balanced_labels_and_sampler_settings():
  labels = evaluate.balanced_labels(12, 4)
  assert np.bincount(labels).tolist() == [3, 3, 3, 3] and (np.diff(labels) >= 0).all()
  with pytest.raises(ValueError, match="multiple"):
    evaluate.balanced_labels(10, 4)
  s = eval_generators.sampler_settings(demo.get_config())
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
