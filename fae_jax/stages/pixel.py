"""Stage `pixel`: the pixel decoder, trained in two phases, evaluated, and exported.

```
phase `noisy`    (pixel/noisy/):    frozen encoder features x + sigma * eps  -> decoder -> image
phase `finetune` (pixel/finetune/): frozen FAE x_hat = D(z), z ~ q(z | x)    -> decoder -> image
```
Both phases are `fae_jax.train.loop.train` runs (own checkpoints, resumable, EMA, NaN guard,
metrics). Phase `finetune` starts from phase `noisy`'s final weights (the decoder's EMA, the
discriminator's raw weights): the stage writes them as a step-0 checkpoint of `pixel/finetune`
(`_seed_checkpoint`), which the loop then restores like any other checkpoint. That keeps the
weights out of the jitted init (a closure returning them would bake every parameter into the
executable as a constant: 1.2 GB for ViT-L) and makes the start itself resumable.
`num_steps = 0` disables a phase.

Objective (fae_jax.losses.pixel): `rec_weight * L1|L2 + perc_weight * perceptual + GAN`, with
  * perceptual 'dino': MSE between the frozen encoder's features of the reconstruction and of the
    target (offline; the encoder weights are already here), or 'lpips' (LPIPS-VGG from weights
    converted with `python -m fae_jax.convert lpips`), or 'none';
  * GAN: a PatchGAN (fae_jax.models.discriminator: taming's `NLayerDiscriminator` with GroupNorm,
    the discriminator of VQGAN and TiTok; small, local, and a pure function of its params) with
    hinge losses, both switched on at the phase-local step `gan_start`, the generator term
    optionally scaled by VQGAN's adaptive weight. Generator and discriminator share ONE param tree
    `{'decoder', 'disc'}` and ONE optimizer: the loss is `generator terms(decoder, sg(disc)) +
    d_hinge(disc, sg(recon))`, so each part only receives its own gradient. The discriminator
    exists only when `loss.gan_weight > 0`. The gate needs the step: `loop.train(...,
    loss_takes_step=True)` passes the traced `state.step`.

Inputs: `pixel.input='encoder'` runs the frozen encoder inside the step on the image batch
(`pipeline.make_dataset`, any augmentation); `'cache'` reads the `encode` stage's features and
pairs each with its source image by id (no augmentation). Frozen weights (encoder, FAE, LPIPS)
enter the step through the loop's `extra_args` (sharded jit arguments). Targets are the data
images in [-1, 1]; when the decoder's output size (`grid * patch_size`) differs from the data
resolution, targets are resized to it (PyTorch-exact antialiased bicubic) for training, and
reconstructions are resized back to the data resolution for every metric and for the
`fae_jax.autoencoder` API.

Evaluation (held-out split): PSNR and SSIM (uint8 images at the data resolution, as saved) and
rFD-DINOv2 (Frechet distance between the frozen encoder's mean-pooled features of the
reconstructions and of the originals, float64 eigendecomposition) for
  * the full path image -> encoder -> FAE (posterior MEAN: the deterministic reconstruction) ->
    feature decoder -> pixel decoder (the final decoder), report `psnr_full`, ...;
  * the noisy-feature path: the phase-`noisy` decoder on the clean encoder features (noise is a
    training-only regulariser), report `psnr_noisy_features`, ....
plus PNG grids (originals next to reconstructions) in `pixel/` and TensorBoard.

Outputs in `<workdir>/pixel/`: `noisy/`, `finetune/` (TensorBoard, `train_log.jsonl`,
`checkpoints/`), `export/` (final decoder EMA weights + `model.json`), `export_noisy/` (the
phase-`noisy` decoder, reusable across FAE variants), `reconstructions*.png`, `results.json`.
The stage is complete when `results.json` exists.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from fae_jax import params_store, sharding
from fae_jax.convert import lpips as lpips_convert
from fae_jax.data import array_cache, pipeline, sources
from fae_jax.evaluation import frechet, grids, image_metrics
from fae_jax.losses import pixel as pixel_losses
from fae_jax.models import discriminator as disc_model
from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range
from fae_jax.models.resize import resize_bicubic
from fae_jax.report import write_json_atomic
from fae_jax.stages import encode
from fae_jax.stages import fae as fae_stage
from fae_jax.stages.context import StageContext
from fae_jax.train import checkpoint as ckpt_lib
from fae_jax.train import loop, optim
from fae_jax.train.state import TrainState, raw_key

NAME = "pixel"
PHASES = ("noisy", "finetune")
EXPORT = "export"
EXPORT_NOISY = "export_noisy"
EXPORT_META = "model.json"
RESULTS = "results.json"
GRID_PNG = "reconstructions.png"
GRID_NOISY_PNG = "reconstructions_noisy_features.png"

INPUTS = ("encoder", "cache")
PERCEPTUAL = ("dino", "lpips", "none")
# `config.pixel.model` fields that are not PixelDecoderConfig fields (they come from the encoder).
_DERIVED = ("feature_dim", "grid")
# Grids of small images are enlarged (nearest neighbour) to about this many pixels per side.
_GRID_MIN_SIDE = 112


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------


def decoder_config(config: ml_collections.ConfigDict, spec: EncoderSpec) -> pd.PixelDecoderConfig:
  fields = dict(config.pixel.model)
  for name in _DERIVED:
    fields.pop(name, None)
  return pd.PixelDecoderConfig(feature_dim=spec.feature_dim, grid=spec.grid, **fields)


def discriminator_config(config: ml_collections.ConfigDict) -> disc_model.DiscriminatorConfig:
  return disc_model.DiscriminatorConfig(**dict(config.pixel.disc))


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  return float(config.pixel.loss.gan_weight) > 0


def phase_stage(phase: str) -> str:
  """The loop's `stage` (subfolder of the workdir) of a phase: 'pixel/noisy', 'pixel/finetune'."""
  return f"{NAME}/{phase}"


def _check_config(config: ml_collections.ConfigDict) -> None:
  p = config.pixel
  if p.input not in INPUTS:
    raise ValueError(f"config.pixel.input must be one of {INPUTS}, got {p.input!r}.")
  if p.loss.perceptual not in PERCEPTUAL:
    raise ValueError(
      f"config.pixel.loss.perceptual must be one of {PERCEPTUAL}, got {p.loss.perceptual!r}."
    )
  if p.loss.rec not in pixel_losses.REC_KINDS:
    raise ValueError(
      f"config.pixel.loss.rec must be one of {pixel_losses.REC_KINDS}, got {p.loss.rec!r}."
    )
  if p.noise.mode not in pd.NOISE_MODES:
    raise ValueError(
      f"config.pixel.noise.mode must be one of {pd.NOISE_MODES}, got {p.noise.mode!r}."
    )
  if p.loss.perceptual == "lpips" and float(p.loss.perc_weight) > 0 and not p.loss.lpips_dir:
    raise ValueError(
      "config.pixel.loss.perceptual='lpips' needs config.pixel.loss.lpips_dir: convert the "
      "official weights once with `python -m fae_jax.convert lpips --vgg=vgg16-397923af.pth "
      "--lin=vgg.pth --out=DIR`, or use perceptual='dino' (offline)."
    )
  if all(int(p[phase].train.num_steps) <= 0 for phase in PHASES):
    raise ValueError("config.pixel: both phases have num_steps 0; nothing to train.")


def _data_image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`(H, W)` of the pipeline's images: `data.image_size`, or the native size of the data."""
  if config.data.get("image_size"):
    size = int(config.data.image_size)
    return size, size
  source = sources.make_source(config.data, config.data.train_split)
  for index in range(min(len(source), 64)):
    record = source[index]
    if record is not None:
      return tuple(int(s) for s in record["image"].shape[:2])
  raise ValueError("config.data: no readable image among the first 64 training examples.")


# ----------------------------------------------------------------------------------------------
# Inference (shared with fae_jax.autoencoder).
# ----------------------------------------------------------------------------------------------


def quantize(images: jax.Array) -> jax.Array:
  """Floats in [-1, 1] -> uint8, exactly `fae_jax.evaluation.grids.to_uint8`, jittable."""
  return jnp.clip(jnp.rint((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def resize_images(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`[B, H, W, C]` floats -> `[B, *size, C]` (antialiased PyTorch bicubic); identity if equal."""
  if tuple(images.shape[1:3]) == tuple(size):
    return images
  return resize_bicubic(images, tuple(size), antialias=True)


@dataclasses.dataclass(frozen=True)
class InferenceFns:
  """Jitted inference functions; every weight is an argument, never a constant.

  Attributes:
    features: `(encoder_params, uint8 images [B, H, W, 3]) -> [B, N, D]` frozen-encoder features.
    encode: `(fae_params, features [B, N, D]) -> [B, h, w, c]` posterior mean.
    decode: `(fae_params, decoder_params, latents [B, h, w, c]) -> uint8 [B, H, W, 3]` at the
      data resolution (feature decoder, pixel decoder, resize, quantise).
    decode_features: `(decoder_params, features [B, N, D]) -> uint8 [B, H, W, 3]`.
  """

  features: Callable[..., jax.Array]
  encode: Callable[..., jax.Array]
  decode: Callable[..., jax.Array]
  decode_features: Callable[..., jax.Array]


@functools.lru_cache(maxsize=8)
def make_inference_fns(
  spec: EncoderSpec,
  fae_config: fae_model.FaeConfig | None,
  decoder_cfg: pd.PixelDecoderConfig,
  image_size: tuple[int, int],
  *,
  encoder_dtype: Any = jnp.float32,
  fae_dtype: Any = jnp.float32,
  decoder_dtype: Any = jnp.float32,
) -> InferenceFns:
  """The stage's evaluation and `fae_jax.autoencoder.Autoencoder` both use these functions.

  Cached on the (hashable) configs, so loading the same run again reuses the compiled code.
  """
  decoder = pd.PixelDecoder(decoder_cfg, dtype=jnp.dtype(decoder_dtype))
  fae = fae_model.Fae(fae_config, dtype=jnp.dtype(fae_dtype)) if fae_config is not None else None

  def need_fae():
    if fae is None:
      raise ValueError("These inference functions were built without an FAE config.")
    return fae

  def to_images(tokens, decoder_params):
    out = decoder.apply({"params": decoder_params}, tokens)
    return quantize(resize_images(out, image_size))

  @jax.jit
  def features(encoder_params, images):
    x = images_to_model_range(images)
    return encode_images(spec, encoder_params, x, dtype=jnp.dtype(encoder_dtype))

  @jax.jit
  def encode_fn(fae_params, feats):
    mean, _ = need_fae().apply({"params": fae_params}, feats, method=fae_model.Fae.encode)
    return mean

  @jax.jit
  def decode(fae_params, decoder_params, latents):
    x_hat = need_fae().apply(
      {"params": fae_params}, latents.astype(jnp.float32), method=fae_model.Fae.decode
    )
    return to_images(x_hat, decoder_params)

  @jax.jit
  def decode_features(decoder_params, feats):
    return to_images(feats.astype(jnp.float32), decoder_params)

  return InferenceFns(features, encode_fn, decode, decode_features)


# ----------------------------------------------------------------------------------------------
# Exports.
# ----------------------------------------------------------------------------------------------


def load_export(directory) -> tuple[Any, pd.PixelDecoderConfig, dict[str, Any]]:
  """Exported pixel decoder: `(params, PixelDecoderConfig, meta)`."""
  meta = params_store.load_meta(
    directory, EXPORT_META, "Run the `pixel` stage first (python -m fae_jax.main ... stages pixel)."
  )
  return params_store.load_params(directory), pd.PixelDecoderConfig.from_dict(meta["config"]), meta


def _write_export(directory: epath.Path, params: Any, meta: dict[str, Any]) -> None:
  """Writes an export, replacing one of another step or phase (e.g. a phase trained longer).

  The new export is complete on disk before the old one is moved away, so a crash leaves either
  of the two (or, between the two renames, the new one under a temporary name: rerun).
  """
  if params_store.exists(directory, EXPORT_META):
    old = params_store.load_meta(directory, EXPORT_META, "")
    if (old.get("phase"), old.get("step")) == (meta["phase"], meta["step"]):
      return
    fresh = directory.parent / f".{directory.name}.new"
    stale = directory.parent / f".{directory.name}.old"
    for path in (fresh, stale):
      if path.exists():
        path.rmtree()
    params_store.save_params(fresh, params, meta, EXPORT_META)
    directory.rename(stale)
    fresh.rename(directory)
    stale.rmtree()
    return
  params_store.save_params(directory, params, meta, EXPORT_META)


def is_complete(ctx: StageContext) -> bool:
  return (ctx.stage_dir(NAME) / RESULTS).exists()


# ----------------------------------------------------------------------------------------------
# Training data.
# ----------------------------------------------------------------------------------------------


class PairedCacheSource:
  """Cached features of the `encode` stage, each with the image it was computed from.

  `source[i] = {'features': [N, D], 'image': uint8 [H, W, 3], 'valid': uint8}`; the image is the
  record `id` of the dataset split (centre-cropped like the pipelines), so features and target
  always belong together. Picklable (grain workers) because both sources are.
  """

  def __init__(self, cache: array_cache.CacheSource, images: Any, image_size: int | None):
    self.cache = cache
    self.images = images
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.cache)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    record = self.cache[index]
    valid = bool(record.get("valid", 1))
    image = self.images[int(record["id"])] if valid else None
    if image is None:
      return {"features": record["features"], "image": None, "valid": np.uint8(0)}
    return {
      "features": record["features"],
      "image": pipeline.center_crop_adm(image["image"], self.image_size),
      "valid": np.uint8(1),
    }


def _cache_source(ctx: StageContext, split_key: str, encoder_meta: dict[str, Any]):
  return encode.feature_cache_source(ctx, split_key, encoder_meta, "pixel")


def _make_data_iter_fn(
  ctx: StageContext, per_process: int, encoder_meta: dict[str, Any]
) -> Callable[[], Any]:
  config = ctx.config
  if config.pixel.input == "cache":
    if config.data.get("random_flip"):
      logging.warning("pixel: input='cache' reads unaugmented features; data.random_flip ignored.")
    paired = PairedCacheSource(
      _cache_source(ctx, "train", encoder_meta),
      sources.make_source(config.data, config.data.train_split),
      config.data.get("image_size"),
    )

    def cached():
      ds = pipeline.make_cache_dataset(
        paired, batch_size=per_process, seed=config.seed, data_config=config.data
      )
      return iter(ds.map(lambda b: {"features": b["features"], "image": b["image"]}))

    return cached

  def on_the_fly():
    ds = pipeline.make_dataset(
      config.data,
      config.data.train_split,
      batch_size=per_process,
      seed=config.seed,
      shuffle=True,
      end_index=config.data.max_train_examples,
    )
    return iter(ds.map(lambda b: {"image": b["image"]}))

  return on_the_fly


# ----------------------------------------------------------------------------------------------
# Objective.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Models:
  spec: EncoderSpec
  decoder: pd.PixelDecoder
  disc: disc_model.PatchDiscriminator | None
  fae: fae_model.Fae | None
  encoder_dtype: Any


def _perceptual_fn(loss_cfg, models: _Models, frozen: dict[str, Any]):
  if loss_cfg.perceptual == "none" or float(loss_cfg.perc_weight) <= 0:
    return None
  if loss_cfg.perceptual == "dino":
    encode_fn = functools.partial(
      encode_images, models.spec, frozen["encoder"], dtype=models.encoder_dtype
    )
    return functools.partial(pixel_losses.dino_feature_loss, encode_fn)
  return functools.partial(pixel_losses.lpips_loss, frozen["lpips"])


def make_loss_fn(
  config: ml_collections.ConfigDict, phase: str, models: _Models
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """`(params, batch, rng, frozen, *, step) -> (loss, metrics)` of one phase.

  `params = {'decoder': ..., ['disc': ...]}`; `frozen` holds what the phase needs of
  `encoder` (features on the fly, 'dino' loss), `fae` (phase `finetune`) and `lpips`.
  """
  p = config.pixel
  loss_cfg, noise = p.loss, p.noise
  gan_start = int(p[phase].gan_start)
  sample_posterior = bool(p.finetune.get("sample_posterior", True))
  out_size = models.decoder.config.image_size
  rec_kind, rec_weight = loss_cfg.rec, float(loss_cfg.rec_weight)
  perc_weight = float(loss_cfg.perc_weight)

  def loss_fn(params, batch, rng, frozen, *, step):
    images = images_to_model_range(batch["image"])
    if "features" in batch:
      x = batch["features"].astype(jnp.float32)
    else:
      x = encode_images(models.spec, frozen["encoder"], images, dtype=models.encoder_dtype)
    x = jax.lax.stop_gradient(x)
    noise_rng, posterior_rng = jax.random.split(rng)
    if phase == "noisy":
      tokens = pd.add_feature_noise(
        x, noise_rng, mode=noise.mode, sigma=float(noise.sigma), tau=float(noise.tau), train=True
      )
    else:
      fae_params = frozen["fae"]
      mean, logvar = models.fae.apply({"params": fae_params}, x, method=fae_model.Fae.encode)
      z = fae_model.sample(mean, logvar, posterior_rng) if sample_posterior else mean
      tokens = models.fae.apply({"params": fae_params}, z, method=fae_model.Fae.decode)
      tokens = jax.lax.stop_gradient(tokens)
    target = resize_images(images, out_size)
    perceptual = _perceptual_fn(loss_cfg, models, frozen)

    def decode(decoder_params):
      return models.decoder.apply({"params": decoder_params}, tokens)

    recon = decode(params["decoder"])
    common = dict(
      rec=rec_kind, rec_weight=rec_weight, perceptual_fn=perceptual, perc_weight=perc_weight
    )
    if models.disc is None:
      loss, metrics = pixel_losses.pixel_loss(target, recon, **common)
      metrics["gen_loss"] = metrics.pop("loss")
      return loss, metrics

    disc_params = params["disc"]
    frozen_disc = jax.lax.stop_gradient(disc_params)

    def logits(d_params, imgs):
      return models.disc.apply({"params": d_params}, imgs)

    gan_weight = jnp.float32(loss_cfg.gan_weight)
    if loss_cfg.adaptive_gan_weight:

      def terms(decoder_params):
        r = decode(decoder_params)
        rec_terms = rec_weight * pixel_losses.reconstruction_loss(target, r, rec_kind)
        if perceptual is not None:
          rec_terms = rec_terms + perc_weight * perceptual(target, r)
        return rec_terms, pixel_losses.g_hinge_loss(logits(frozen_disc, r))

      def adaptive():
        norms = pixel_losses.last_layer_grad_norms(terms, params["decoder"])
        return pixel_losses.adaptive_gan_weight(*norms, max_weight=float(loss_cfg.adaptive_max))

      # A cond, not a select: before `gan_start` the extra backward pass is skipped entirely.
      active = pixel_losses.gan_active(step, gan_start)
      gan_weight = gan_weight * jax.lax.cond(active, adaptive, lambda: jnp.float32(0.0))
    gen_loss, metrics = pixel_losses.pixel_loss(
      target,
      recon,
      **common,
      gan_logits_fake=logits(frozen_disc, recon),
      gan_weight=gan_weight,
      step=step,
      gan_start=gan_start,
    )
    metrics["gen_loss"] = metrics.pop("loss")
    metrics["gan_term"] = metrics["gan_weight"] * metrics["g_loss"]
    d_loss, d_metrics = pixel_losses.discriminator_loss(
      logits(disc_params, target),
      logits(disc_params, jax.lax.stop_gradient(recon)),
      step=step,
      gan_start=gan_start,
    )
    metrics.update(d_metrics)
    return gen_loss + d_loss, metrics

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Phases.
# ----------------------------------------------------------------------------------------------


def _seed_checkpoint(
  ctx: StageContext,
  phase: str,
  train_cfg: ml_collections.ConfigDict,
  init_params_fn: Callable[[jax.Array], Any],
  start_params: Any,
  start: dict[str, Any],
  data_iter_fn: Callable[[], Any],
) -> None:
  """Writes step 0 of `phase` holding `start_params` (from the phase described by `start`).

  The state gets the loop's shardings (`loop.abstract_train_state`) and a fresh optimizer; it is
  built by a jit that takes `start_params` as an argument (no random init is compiled or run).
  Skipped once `phase` has trained (a checkpoint after step 0: it resumes from its own). A step-0
  checkpoint of another start (the previous phase was trained further since) is replaced.
  """
  directory = ctx.workdir / phase_stage(phase) / "checkpoints"

  def open_checkpointer():
    return ckpt_lib.Checkpointer(
      directory, checkpoint_every=0, keep=train_cfg.get("keep", 3), async_save=False
    )

  ckpt = open_checkpointer()
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      if latest > 0 or ckpt.restore_config(0).get("pixel_start") == start:
        return
      ckpt.close()
      logging.info("pixel/%s: the previous phase changed since its step 0; seeding again.", phase)
      directory.rmtree()
      ckpt = open_checkpointer()
    tx, _ = optim.make_optimizer(train_cfg)
    abstract, shardings = loop.abstract_train_state(
      config=train_cfg, mesh=ctx.mesh, init_params_fn=init_params_fn, tx=tx, seed=ctx.config.seed
    )
    use_ema = abstract.ema_params is not None

    def build(params, rng):
      return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(lambda a: a + jnp.zeros_like(a), params) if use_ema else None,
        rng=rng,
      )

    # The phase's own step keys: `fold_in(key(seed), phase index)`.
    rng = raw_key(jax.random.fold_in(jax.random.key(ctx.config.seed), PHASES.index(phase)))
    params = jax.device_put(start_params, shardings.params)
    state = jax.jit(build, out_shardings=shardings)(params, rng)
    saved = {**ckpt_lib.config_to_json(ctx.config), "pixel_start": start}
    ckpt.save(0, state, data_iter_fn(), saved, force=True)
    ckpt.wait()
    logging.info("pixel/%s: starts from %s (step-0 checkpoint).", phase, start)
  finally:
    ckpt.close()


def _final_params(state) -> tuple[Any, str]:
  if state.ema_params is not None:
    return state.ema_params, "ema"
  return state.params, "raw"


def _loss_curve(ctx: StageContext, phase: str) -> dict[str, float]:
  path = ctx.workdir / phase_stage(phase) / "train_log.jsonl"
  if not path.exists():
    return {}
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  if not losses:
    return {}
  out = {
    f"{phase}_train_loss_first": float(losses[0]),
    f"{phase}_train_loss_last": float(losses[-1]),
  }
  psnrs = [r["train/psnr"] for r in rows if "train/psnr" in r]
  if psnrs:
    out[f"{phase}_train_psnr_last"] = float(psnrs[-1])
  return out


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PathStats:
  psnr: list
  ssim: list
  fd: frechet.StatsAccumulator | None
  grid: list


def evaluate(
  ctx: StageContext,
  fns: InferenceFns,
  *,
  encoder_params: Any,
  paths: dict[str, tuple[str, Any]],
  fae_params: Any = None,
  rfd_paths: tuple[str, ...] = (),
  grid_images: int = 0,
) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Held-out reconstruction metrics of several decoding paths.

  Args:
    ctx: the stage context (data config, eval settings).
    fns: `make_inference_fns(...)`.
    encoder_params: frozen encoder weights.
    paths: name -> (kind, decoder params), kind 'features' (decoder on the clean encoder
      features) or 'full' (encoder -> FAE posterior mean -> feature decoder -> decoder).
    fae_params: the FAE's weights (for 'full' paths).
    rfd_paths: the paths whose rFD-DINOv2 to compute (one more encoder forward per image).
    grid_images: how many (original, reconstruction) pairs to return per path.

  Returns:
    `(metrics, grids)`: `{f'psnr_{name}', f'ssim_{name}', f'rfd_dinov2_{name}' (rfd_paths),
    'eval_examples'}` and `{name: (originals, reconstructions)}` uint8 arrays.
  """
  config = ctx.config
  cfg = config.pixel.eval
  bs = int(cfg.batch_size)
  limits = [int(v) for v in (cfg.get("max_examples"), config.data.max_eval_examples) if v]
  ds = pipeline.make_ordered_dataset(
    config.data,
    config.data.eval_split,
    batch_size=bs,
    end_index=min(limits) if limits else None,
    process_index=0,
    process_count=1,
  )
  stats = {
    name: _PathStats([], [], frechet.StatsAccumulator() if name in rfd_paths else None, [])
    for name in paths
  }
  real_fd = frechet.StatsAccumulator() if any(name in rfd_paths for name in paths) else None
  originals, count = [], 0
  for batch in ds:
    keep = np.asarray(batch["valid"]).astype(bool)
    if not keep.any():
      continue
    images = np.asarray(batch["image"])  # padded batches keep one static shape: one compile
    feats = fns.features(encoder_params, images)
    latents = None
    if real_fd is not None:
      real_fd.update(np.asarray(frechet.fd_features(feats))[keep])
    real = images[keep]
    if sum(len(o) for o in originals) < grid_images:
      originals.append(real)
    for name, (kind, decoder_params) in paths.items():
      if kind == "features":
        recon = fns.decode_features(decoder_params, feats)
      else:
        if latents is None:
          latents = fns.encode(fae_params, feats)
        recon = fns.decode(fae_params, decoder_params, latents)
      s = stats[name]
      if s.fd is not None:
        s.fd.update(np.asarray(frechet.fd_features(fns.features(encoder_params, recon)))[keep])
      recon = np.asarray(recon)[keep]
      s.psnr.append(image_metrics.psnr(real, recon))
      s.ssim.append(image_metrics.ssim(real, recon))
      if sum(len(g) for g in s.grid) < grid_images:
        s.grid.append(recon)
    count += int(keep.sum())
  if count == 0:
    raise ValueError(f"pixel: no readable held-out image in split {config.data.eval_split!r}.")
  metrics: dict[str, float] = {"eval_examples": count}
  out_grids = {}
  real_stats = real_fd.finalize() if real_fd is not None and count > 1 else None
  for name, s in stats.items():
    metrics[f"psnr_{name}"] = float(np.mean(np.concatenate(s.psnr)))
    metrics[f"ssim_{name}"] = float(np.mean(np.concatenate(s.ssim)))
    if real_stats is not None and s.fd is not None:
      metrics[f"rfd_dinov2_{name}"] = frechet.frechet_distance(real_stats, s.fd.finalize())
    if grid_images:
      out_grids[name] = (
        np.concatenate(originals)[:grid_images],
        np.concatenate(s.grid)[:grid_images],
      )
  return metrics, out_grids


def _grid(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  upscale = max(1, -(-_GRID_MIN_SIDE // int(originals.shape[1])))
  return grids.side_by_side(originals, recons, pairs_per_row=8, upscale=upscale)


# ----------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------


def _load_fae(ctx: StageContext, encoder_meta: dict[str, Any]):
  """`(params, FaeConfig, meta)` of `fae/export`, or None when there is none."""
  directory = ctx.stage_dir(fae_stage.NAME) / fae_stage.EXPORT
  if not params_store.exists(directory, fae_stage.EXPORT_META):
    return None
  params, cfg, meta = fae_stage.load_export(directory)
  if meta.get("encoder_fingerprint") != encoder_meta["fingerprint"]:
    raise ValueError(
      f"{directory} was trained on features of another encoder (fingerprint "
      f"{meta.get('encoder_fingerprint')}, this run's encoder {encoder_meta['fingerprint']}); "
      "rerun the `fae` stage in this workdir."
    )
  return params, cfg, meta


@dataclasses.dataclass
class _Run:
  """What the phases, the evaluation and the exports of one stage run share."""

  ctx: StageContext
  spec: EncoderSpec
  encoder_params: Any
  encoder_meta: dict[str, Any]
  decoder_cfg: pd.PixelDecoderConfig
  image_size: tuple[int, int]
  models: _Models
  fns: InferenceFns
  fae: tuple[Any, fae_model.FaeConfig, dict[str, Any]] | None
  frozen: dict[str, Any]  # frozen weights every phase's loss reads (encoder, lpips)

  @property
  def stage_dir(self) -> epath.Path:
    return self.ctx.stage_dir(NAME)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    rng_decoder, rng_disc = jax.random.split(rng)
    tokens = jnp.zeros((1, self.spec.num_tokens, self.spec.feature_dim), jnp.float32)
    params = {"decoder": self.models.decoder.init(rng_decoder, tokens)["params"]}
    if self.models.disc is not None:
      image = jnp.zeros((1, *self.decoder_cfg.image_size, 3), jnp.float32)
      params["disc"] = self.models.disc.init(rng_disc, image)["params"]
    return params

  def export(self, directory: epath.Path, decoder_params: Any, state, phase: str) -> None:
    if jax.process_index() != 0:
      return
    config = self.ctx.config
    meta = {
      "model": "pixel_decoder",
      "config": self.decoder_cfg.to_dict(),
      "phase": phase,
      "weights": "ema" if state.ema_params is not None else "raw",
      "step": int(state.step),
      "image_size": list(self.image_size),
      "encoder": {
        "fingerprint": self.encoder_meta["fingerprint"],
        "image_size": int(self.spec.image_size),
        "features": self.spec.features,
        "random": bool(self.encoder_meta["source"].get("random")),
      },
      "dtypes": {
        "encoder": str(config.encoder.dtype),
        "fae": str(config.fae.dtype),
        "decoder": str(config.pixel.dtype),
      },
      "noise": dict(config.pixel.noise),
    }
    if phase == "finetune":
      _, fae_cfg, fae_meta = self.fae
      meta["fae"] = {"step": int(fae_meta["step"]), "config": fae_cfg.to_dict()}
    _write_export(directory, decoder_params, meta)


def _setup(ctx: StageContext) -> _Run:
  config = ctx.config
  p = config.pixel
  _check_config(config)
  encoder_params, spec, encoder_meta = encode.load_frozen_encoder(ctx)
  decoder_cfg = decoder_config(config, spec)
  image_size = _data_image_size(config)
  fae = _load_fae(ctx, encoder_meta)
  if int(p.finetune.train.num_steps) > 0 and fae is None:
    raise FileNotFoundError(
      f"pixel: phase `finetune` needs the FAE export {ctx.stage_dir('fae') / 'export'}: run the "
      "`fae` stage first (add 'fae' to config.stages), or set "
      "config.pixel.finetune.train.num_steps=0 to train on noisy features only."
    )
  fae_cfg = fae[1] if fae is not None else None
  if decoder_cfg.image_size != image_size:
    logging.info(
      "pixel: decoder output %s vs data %s: targets are resized to the decoder's size, "
      "reconstructions back to the data's for metrics.",
      decoder_cfg.image_size,
      image_size,
    )
  perceptual = p.loss.perceptual if float(p.loss.perc_weight) > 0 else "none"
  frozen = {}
  if p.input == "encoder" or perceptual == "dino":
    frozen["encoder"] = encoder_params
  if perceptual == "lpips":
    frozen["lpips"], _ = lpips_convert.load_lpips(p.loss.lpips_dir)
  dtypes = {
    "encoder_dtype": jnp.dtype(config.encoder.dtype),
    "fae_dtype": jnp.dtype(config.fae.dtype),
    "decoder_dtype": jnp.dtype(p.dtype),
  }
  models = _Models(
    spec=spec,
    decoder=pd.PixelDecoder(decoder_cfg, dtype=dtypes["decoder_dtype"]),
    disc=disc_model.PatchDiscriminator(discriminator_config(config)) if uses_gan(config) else None,
    fae=fae_model.Fae(fae_cfg, dtype=dtypes["fae_dtype"]) if fae_cfg else None,
    encoder_dtype=dtypes["encoder_dtype"],
  )
  return _Run(
    ctx=ctx,
    spec=spec,
    encoder_params=encoder_params,
    encoder_meta=encoder_meta,
    decoder_cfg=decoder_cfg,
    image_size=image_size,
    models=models,
    fns=make_inference_fns(spec, fae_cfg, decoder_cfg, image_size, **dtypes),
    fae=fae,
    frozen=frozen,
  )


def _train_phase(r: _Run, phase: str, previous: tuple[Any, dict[str, Any]] | None):
  """Trains (or resumes, or restores a finished) `phase`; returns its final `TrainState`."""
  ctx, config = r.ctx, r.ctx.config
  train_cfg = config.pixel[phase].train
  sharding.check_batch_divisible(int(train_cfg.batch_size), ctx.mesh, f"config.pixel.{phase}")
  per_process = int(train_cfg.batch_size) // jax.process_count()
  data_iter_fn = _make_data_iter_fn(ctx, per_process, r.encoder_meta)
  fae_params = r.fae[0] if r.fae is not None else None
  frozen = dict(r.frozen)
  if phase == "finetune":
    frozen["fae"] = fae_params
  if previous is not None:
    _seed_checkpoint(ctx, phase, train_cfg, r.init_params, *previous, data_iter_fn)
  eval_fn = None
  if int(train_cfg.eval_every) > 0:
    kind = "features" if phase == "noisy" else "full"

    def eval_fn(state):
      params, _ = _final_params(state)
      metrics, _ = evaluate(
        ctx,
        r.fns,
        encoder_params=r.encoder_params,
        paths={kind: (kind, jax.device_get(params["decoder"]))},
        fae_params=fae_params,
      )
      return metrics

  return loop.train(
    workdir=ctx.workdir,
    stage=phase_stage(phase),
    config=train_cfg,
    mesh=ctx.mesh,
    init_params_fn=r.init_params,
    loss_fn=make_loss_fn(config, phase, r.models),
    data_iter_fn=data_iter_fn,
    seed=config.seed,
    flops_per_example=pd.pixel_decoder_flops_per_example(r.decoder_cfg),
    eval_fn=eval_fn,
    extra_args=(frozen,),
    saved_config=config,
    loss_takes_step=True,
  )


def _write_grids(r: _Run, pairs: dict[str, tuple[np.ndarray, np.ndarray]], step: int, metrics):
  """PNG files and TensorBoard images of the grids; returns `{report key: png path}`."""
  out = {}
  writer = metric_writers.create_default_writer(r.stage_dir)
  for name, png in (("full", GRID_PNG), ("noisy_features", GRID_NOISY_PNG)):
    if name not in pairs:
      continue
    grid = _grid(*pairs[name])
    grids.save_png(r.stage_dir / png, grid)
    grids.write_grid_to_tensorboard(writer, step, f"reconstructions/{name}", grid)
    out[f"grid_png_{name}"] = str(r.stage_dir / png)
  writer.write_scalars(step, {f"eval/{k}": float(v) for k, v in metrics.items()})
  writer.close()
  # The headline grid is the full path's (the noisy-feature path's without an FAE).
  out["grid_png"] = out.pop("grid_png_full", out.get("grid_png_noisy_features"))
  return out


def run(ctx: StageContext) -> dict:
  config = ctx.config
  p = config.pixel
  r = _setup(ctx)
  results: dict[str, Any] = {}
  finals: dict[str, Any] = {}  # phase -> the decoder's final (EMA) params, on the host
  previous = None  # (params, description) the next phase starts from
  for phase in PHASES:
    if int(p[phase].train.num_steps) <= 0:
      logging.info("pixel: phase %s disabled (num_steps 0).", phase)
      continue
    t0 = time.time()
    state = _train_phase(r, phase, previous)
    results[f"train_seconds_{phase}"] = round(time.time() - t0, 1)
    results[f"steps_{phase}"] = int(state.step)
    final, weights = _final_params(state)
    # The next phase takes the decoder's average and the discriminator's raw weights (the
    # discriminator was trained against the raw decoder; its average never played).
    start = {"decoder": final["decoder"]}
    if "disc" in state.params:
      start["disc"] = state.params["disc"]
    previous = (start, {"phase": phase, "step": int(state.step), "decoder_weights": weights})
    finals[phase] = jax.device_get(final["decoder"])
    if phase == "noisy":
      r.export(r.stage_dir / EXPORT_NOISY, finals[phase], state, phase)
    if phase == "finetune" or int(p.finetune.train.num_steps) <= 0:  # the final decoder
      r.export(r.stage_dir / EXPORT, finals[phase], state, phase)
    results.update(_loss_curve(ctx, phase))
    del state

  logging.info("pixel: evaluating on the held-out split")
  final_decoder = finals.get("finetune", finals.get("noisy"))
  paths = {"noisy_features": ("features", finals.get("noisy", final_decoder))}
  if r.fae is not None:
    paths["full"] = ("full", final_decoder)
    if len(finals) == 2:
      paths["full_before_finetune"] = ("full", finals["noisy"])
  metrics, pairs = evaluate(
    ctx,
    r.fns,
    encoder_params=r.encoder_params,
    paths=paths,
    fae_params=r.fae[0] if r.fae is not None else None,
    rfd_paths=("full", "noisy_features"),
    grid_images=int(p.eval.grid_images),
  )
  # Report names: the full path is the headline (`rfd_dinov2` without a suffix).
  if "rfd_dinov2_full" in metrics:
    metrics["rfd_dinov2"] = metrics.pop("rfd_dinov2_full")
  results.update(metrics)
  if "psnr_full" in metrics:
    results["psnr_full_minus_noisy_features"] = (
      metrics["psnr_full"] - metrics["psnr_noisy_features"]
    )
  if jax.process_index() == 0 and pairs:
    total_steps = sum(results.get(f"steps_{phase}", 0) for phase in PHASES)
    scalars = {k: v for k, v in metrics.items() if k != "eval_examples"}
    results.update(_write_grids(r, pairs, total_steps, scalars))
  results.update(
    {
      "image_size": list(r.image_size),
      "decoder_output_size": list(r.decoder_cfg.image_size),
      "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(final_decoder))),
      "perceptual": p.loss.perceptual if float(p.loss.perc_weight) > 0 else "none",
      "gan": r.models.disc is not None,
      "noise": f"{p.noise.mode}(sigma={p.noise.sigma}, tau={p.noise.tau})",
      "encoder_random": bool(r.encoder_meta["source"].get("random")),
      "export": str(r.stage_dir / EXPORT),
    }
  )
  if "noisy" in finals:
    results["export_noisy"] = str(r.stage_dir / EXPORT_NOISY)
  if jax.process_index() == 0:
    write_json_atomic(r.stage_dir / RESULTS, results)
  logging.info("pixel results: %s", json.dumps(results, sort_keys=True))
  return results
