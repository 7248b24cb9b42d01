"""The `pixel` stage end to end on tiny shapes, the `Autoencoder` API and the LPIPS CLI."""

import json
import shutil

import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from etils import epath

from fae_jax import artifacts, main, params_store
from fae_jax.autoencoder import Autoencoder
from fae_jax.data import pipeline
from fae_jax.evaluation import grids
from fae_jax.stages import pixel as pixel_stage
from fae_jax.train import loop

GAN_START = 2


def tiny_config(make_config):
  """The shared tiny pipeline (conftest) with a pixel decoder of 16 px patches: 32 px out, so the
  28 <-> 32 px resizes are exercised."""
  config = make_config()
  t = config.fae.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every, t.warmup_steps = 2, 8, 1, 2, 1
  config.fae.eval.batch_size = 8
  config.fae.eval.probe_steps = 5
  p = config.pixel
  p.model.width, p.model.depth, p.model.num_heads, p.model.patch_size = 32, 1, 2, 16
  p.loss.perceptual, p.loss.perc_weight = "none", 0.0
  p.loss.gan_weight = 0.0
  p.disc.base_channels, p.disc.num_layers, p.disc.num_groups = 4, 1, 4
  for phase in (p.noisy, p.finetune):
    t = phase.train
    t.num_steps, t.batch_size, t.log_every, t.checkpoint_every, t.warmup_steps = 4, 16, 1, 2, 1
    t.lr = 1e-3
  p.eval.batch_size = 8
  p.eval.grid_images = 8
  return config


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, tiny_pipeline_config, patch_small_encoder):
  """convert, encode, fae and pixel (cached features, DINO perceptual loss on every 2nd step,
  adaptive GAN from step 2 of `noisy` and step 0 of `finetune`), run once for the tests below."""
  workdir = epath.Path(tmp_path_factory.mktemp("pixel_gan"))
  config = tiny_config(tiny_pipeline_config)
  config.stages = ("convert", "encode", "fae", "pixel")
  p = config.pixel
  p.input = "cache"
  p.loss.perceptual, p.loss.perc_weight = "dino", 0.1
  p.loss.perc_phases, p.loss.perc_examples = ("noisy", "finetune"), 0
  p.loss.perc_every = 2  # on the phase-local steps 0, 2, ...
  p.loss.gan_weight = 0.5
  p.noisy.gan_start, p.finetune.gan_start = GAN_START, 0
  with pytest.MonkeyPatch.context() as mp:
    patch_small_encoder(mp)
    report = main.run_stages(config, workdir)
  return workdir, config, report


def _log_rows(workdir, phase):
  path = workdir / "pixel" / phase / "train_log.jsonl"
  return [r for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


@pytest.mark.slow
def test_stage_reports_grids_and_exports(gan_run, small_encoder):
  workdir, config, report = gan_run
  px = report["pixel"]
  for key in ("psnr_full", "psnr_noisy_features", "psnr_full_before_finetune"):
    assert 3.0 < px[key] < 100.0, (key, px[key])
  for key in ("ssim_full", "ssim_noisy_features"):
    assert -1.0 <= px[key] <= 1.0, (key, px[key])
  for key in ("rfd_dinov2", "rfd_dinov2_noisy_features"):
    assert np.isfinite(px[key]) and px[key] >= 0.0, (key, px[key])
  assert px["psnr_full_minus_noisy_features"] == pytest.approx(
    px["psnr_full"] - px["psnr_noisy_features"]
  )
  assert px["steps_noisy"] == 4 and px["steps_finetune"] == 4 and px["eval_examples"] == 16
  assert px["image_size"] == [28, 28] and px["decoder_output_size"] == [32, 32]
  assert px["gan"] and px["perceptual"].startswith("dino(")
  for key in ("noisy_train_loss_first", "noisy_train_loss_last", "finetune_train_loss_last"):
    assert np.isfinite(px[key]), key
  # The grid: 8 (original, reconstruction) pairs of 28 px images upscaled 4x, in one row.
  grid = grids.load_png(px["grid_png"])
  assert grid.shape == (2 + 112 + 2, 2 + 16 * (112 + 2), 3)
  assert epath.Path(px["grid_png_noisy_features"]).exists()
  assert list((workdir / "pixel").glob("events.out.tfevents.*")), "no TensorBoard grid"
  # Exports: the decoder alone (no discriminator), EMA weights, with their JSON config.
  params, cfg, meta = artifacts.load_export("pixel", workdir / "pixel" / "export")
  assert set(params) >= {"embed", "head", "pos_embed"} and "disc" not in params
  assert cfg.image_size == (32, 32) and meta["image_size"] == [28, 28]
  assert (meta["phase"], meta["weights"], meta["step"]) == ("finetune", "ema", 4)
  assert meta["fae"]["step"] == 2 and meta["encoder"]["image_size"] == 28
  _, _, noisy_meta = artifacts.load_export("pixel", workdir / "pixel" / "export_noisy")
  assert (noisy_meta["phase"], noisy_meta["step"]) == ("noisy", 4)
  # Complete: a rerun skips every stage and leaves the report alone.
  assert main.run_stages(config, workdir) == report


@pytest.mark.slow
def test_gan_terms_are_zero_before_gan_start(gan_run):
  workdir, _, _ = gan_run
  rows = _log_rows(workdir, "noisy")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # log_every=1: row s holds step s - 1
  for r in rows:
    before = r["step"] - 1 < GAN_START
    for key in ("train/gan_weight", "train/gan_term", "train/d_loss", "train/gan_active"):
      assert (r[key] == 0.0) == before, (r["step"], key, r[key])
    # The perceptual term on every 2nd step (`perc_every`), exactly 0 on the others.
    assert (r["train/perceptual"] > 0.0) == ((r["step"] - 1) % 2 == 0), r
    # The total adds the generator and discriminator objectives, nothing else.
    assert r["train/loss"] == pytest.approx(r["train/gen_loss"] + r["train/d_loss"], rel=1e-5)
  assert all(r["train/gan_active"] == 1.0 for r in _log_rows(workdir, "finetune"))


@pytest.mark.slow
def test_autoencoder_round_trip_matches_the_stage(gan_run, small_encoder):
  workdir, config, report = gan_run
  ae = Autoencoder.load(workdir)
  batch = next(
    iter(pipeline.make_ordered_dataset(config.data, config.data.eval_split, batch_size=8))
  )
  images = np.asarray(batch["image"])
  latents = ae.encode(images)
  assert latents.shape == (8, 2, 2, 4) and latents.dtype == np.float32
  assert ae.latent_shape == (2, 2, 4)
  recon = np.asarray(ae.decode(latents))
  assert recon.shape == (8, 28, 28, 3) and recon.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(ae.reconstruct(images)), recon)
  # The stage's grid holds its full-path reconstructions of the same first 8 held-out images:
  # the API computes exactly them.
  grid = grids.load_png(report["pixel"]["grid_png"])
  cell = lambda col: grid[2 : 2 + 112 : 4, 2 + col * 114 : 2 + col * 114 + 112 : 4]  # noqa: E731
  np.testing.assert_array_equal(np.stack([cell(2 * i) for i in range(8)]), images)
  np.testing.assert_array_equal(np.stack([cell(2 * i + 1) for i in range(8)]), recon)
  with pytest.raises(ValueError, match="uint8 images"):
    ae.encode(images.astype(np.float32))
  with pytest.raises(ValueError, match="latents"):
    ae.decode(np.zeros((1, 2, 2, 5), np.float32))


@pytest.mark.slow
def test_phases_resume_and_finetune_starts_from_noisy_weights(
  gan_run, tmp_path, monkeypatch, small_encoder, tiny_pipeline_config
):
  upstream, _, _ = gan_run
  workdir = epath.Path(tmp_path) / "run"
  # Only the converted encoder upstream: a run reads the outputs of stages it does not run
  # (here `fae`) from its upstream workdir when its own has none.
  encoder_only = epath.Path(tmp_path) / "encoder_only"
  shutil.copytree(upstream / "encoder", encoder_only / "encoder")
  config = tiny_config(tiny_pipeline_config)
  config.upstream_workdir = str(encoder_only)
  config.pixel.input = "encoder"  # the encoder runs in the step; no feature cache needed
  config.pixel.finetune.train.lr = 0.0  # fine-tuning leaves the seeded weights as they are
  config.stages = ("pixel",)
  with pytest.raises(FileNotFoundError, match="`fae` stage"):
    main.run_stages(config, workdir)  # fails before training anything
  assert not (workdir / "pixel" / "noisy").exists()
  shutil.copytree(upstream / "fae" / "export", workdir / "fae" / "export")

  # Phase `noisy` completes, then the run dies at the start of `finetune`.
  real_train = loop.train

  class Killed(Exception):
    pass

  def dies_in_finetune(**kwargs):
    if kwargs["stage"] == "pixel/finetune":
      raise Killed()
    return real_train(**kwargs)

  monkeypatch.setattr(loop, "train", dies_in_finetune)
  with pytest.raises(Killed):
    main.run_stages(config, workdir)
  monkeypatch.setattr(loop, "train", real_train)
  assert [r["step"] for r in _log_rows(workdir, "noisy")] == [1, 2, 3, 4]
  assert artifacts.load_export("pixel", workdir / "pixel" / "export_noisy")[2]["step"] == 4

  # Rerun with a longer phase `noisy`: it resumes at step 4 instead of starting over.
  config.pixel.noisy.train.num_steps = 6
  report = main.run_stages(config, workdir)["pixel"]
  assert [r["step"] for r in _log_rows(workdir, "noisy")] == [1, 2, 3, 4, 5, 6]
  assert report["steps_noisy"] == 6 and report["steps_finetune"] == 4
  assert not report["gan"] and report["perceptual"] == "none"
  noisy, _, noisy_meta = artifacts.load_export("pixel", workdir / "pixel" / "export_noisy")
  tuned, _, _ = artifacts.load_export("pixel", workdir / "pixel" / "export")
  assert noisy_meta["step"] == 6  # the export follows the longer phase
  # EMA updates of unchanged weights round at the last bit, hence a tolerance.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), tuned, noisy)


def test_config_errors_name_the_fix(tiny_pipeline_config):
  config = tiny_config(tiny_pipeline_config)
  config.pixel.loss.perceptual, config.pixel.loss.perc_weight = "lpips", 1.0
  with pytest.raises(ValueError, match="python -m fae_jax.convert lpips"):
    pixel_stage.check_config(config)
  config = tiny_config(tiny_pipeline_config)
  config.pixel.noisy.train.num_steps = config.pixel.finetune.train.num_steps = 0
  with pytest.raises(ValueError, match="nothing to train"):
    pixel_stage.check_config(config)


def test_lpips_cli_converts_and_loads(tmp_path):
  torch = pytest.importorskip("torch")
  from fae_jax.convert import __main__ as convert_cli
  from fae_jax.convert import lpips as lpips_convert
  from fae_jax.models.lpips import VGG16_STAGE_CHANNELS, conv_channels

  gen = torch.Generator().manual_seed(0)
  vgg = {}
  for i, (cin, cout) in conv_channels().items():
    vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen)
    vgg[f"features.{i}.bias"] = torch.randn(cout, generator=gen)
  vgg["classifier.0.bias"] = torch.zeros(4)  # dropped by the converter
  lin = {
    f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
    for k, c in enumerate(VGG16_STAGE_CHANNELS)
  }
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "vgg.pth")
  out = tmp_path / "lpips"
  with flagsaver.flagsaver(
    vgg=str(tmp_path / "vgg16.pth"), lin=str(tmp_path / "vgg.pth"), out=str(out)
  ):
    convert_cli.main(["convert", "lpips"])
  params, meta = lpips_convert.load_lpips(out)
  assert meta["model"] == "lpips_vgg" and params_store.exists(out, lpips_convert.META_NAME)
  np.testing.assert_allclose(
    params["net"]["features_2"]["kernel"],
    np.transpose(vgg["features.2.weight"].numpy(), (2, 3, 1, 0)),
  )
  np.testing.assert_allclose(
    params["lin4"]["kernel"].reshape(-1), lin["lin4.model.1.weight"].reshape(-1)
  )
  with flagsaver.flagsaver(vgg=str(tmp_path / "vgg16.pth"), lin=None, out=str(out)):
    with pytest.raises(Exception, match="--lin"):
      convert_cli.main(["convert", "lpips"])
