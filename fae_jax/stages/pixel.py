"""Stage `pixel`: the pixel decoder, trained in two phases, evaluated, and exported.

```
phase `noisy`    (pixel/noisy/):    frozen encoder features x + sigma * eps  -> decoder -> image
phase `finetune` (pixel/finetune/): frozen FAE x_hat = D(z), z ~ q(z | x)    -> decoder -> image
```
Both phases are `fae_jax.train.loop.train` runs (own checkpoints, resumable, EMA, NaN guard,
metrics). Phase `finetune` starts from phase `noisy`'s final weights (the decoder's EMA, the
discriminator's raw weights) through the loop's `init_params` (a jit argument, never a closure
constant: that would bake every parameter into the executable, 1.2 GB for ViT-L), with its own
step keys `fold_in(key(seed), 1)`. `num_steps = 0` disables a phase.

Objective: `fae_jax.losses.pixel_decoder` (reconstruction + perceptual 'dino' | 'lpips' | 'none'
+ an optional PatchGAN switched on at the phase-local step `gan_start`; the discriminator
exists only when `loss.gan_weight > 0`).

Inputs: `pixel.input='encoder'` runs the frozen encoder inside the step on the image batch
(`pipeline.make_dataset`, any augmentation); `'cache'` reads the `encode` stage's features and
pairs each with its source image by id (no augmentation). Frozen weights (encoder, FAE, LPIPS)
enter the step through the loop's `extra_args` (sharded jit arguments). Targets are the data
images in [-1, 1]; when the decoder's output size (`grid * patch_size`) differs from the data
resolution, targets are resized to it (PyTorch-exact antialiased bicubic) for training, and
reconstructions are resized back to the data resolution for every metric and for the
`fae_jax.autoencoder` API.

Evaluation (held-out split, `fae_jax.evaluation.reconstruction`): PSNR, SSIM and rFD-DINOv2
  * of the full path image -> encoder -> FAE (posterior MEAN) -> feature decoder -> pixel decoder
    (the final decoder), report `psnr_full`, ...;
  * of the noisy-feature path: the phase-`noisy` decoder on the clean encoder features (noise is
    a training-only regulariser), report `psnr_noisy_features`, ....
plus PNG grids (originals next to reconstructions) in `pixel/` and TensorBoard.

Outputs in `<workdir>/pixel/`: `noisy/`, `finetune/` (TensorBoard, `train_log.jsonl`,
`checkpoints/`), `export/` (final decoder EMA weights + `model.json`), `export_noisy/` (the
phase-`noisy` decoder, reusable across FAE variants), `reconstructions*.png`, `results.json`.
The stage is complete when `results.json` exists.
"""

from __future__ import annotations

import dataclasses
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

from fae_jax import artifacts, faults, inference, multihost, sharding
from fae_jax.convert import lpips as lpips_convert
from fae_jax.data import feature_cache, paired_cache, pipeline, sources
from fae_jax.evaluation import grids, reconstruction
from fae_jax.fileio import write_json_atomic
from fae_jax.losses import pixel as pixel_losses
from fae_jax.losses import pixel_decoder as pixel_objective
from fae_jax.losses.pixel_decoder import PixelModels
from fae_jax.models import discriminator as disc_model
from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.encoder import EncoderSpec
from fae_jax.stages.context import StageContext
from fae_jax.train import loop
from fae_jax.train import metrics as train_metrics

NAME = "pixel"
PHASES = ("noisy", "finetune")
RESULTS = "results.json"
GRID_PNG = "reconstructions.png"
GRID_NOISY_PNG = "reconstructions_noisy_features.png"

INPUTS = ("encoder", "cache")
PERCEPTUAL = ("dino", "lpips", "none")
# `config.pixel.model` fields that are not PixelDecoderConfig fields (they come from the encoder).
_DERIVED = ("feature_dim", "grid")


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


def check_config(config: ml_collections.ConfigDict) -> None:
  """The kinds and phases of `config.pixel`; `fae_jax.config_checks` runs it before any stage."""
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
  unknown = set(p.loss.perc_phases) - set(PHASES)
  if unknown:
    raise ValueError(
      f"config.pixel.loss.perc_phases has {sorted(unknown)}; use phases of {PHASES}."
    )
  if int(p.loss.perc_examples) < 0:
    raise ValueError(
      f"config.pixel.loss.perc_examples must be >= 0 (0 = every example), got "
      f"{p.loss.perc_examples}."
    )
  pixel_objective.perceptual_every(p.loss)
  for phase in p.loss.perc_phases:
    if pixel_objective.perceptual_active(p.loss, phase):
      pixel_objective.perceptual_subset(int(p[phase].train.batch_size), int(p.loss.perc_examples))
  if all(int(p[phase].train.num_steps) <= 0 for phase in PHASES):
    raise ValueError("config.pixel: both phases have num_steps 0; nothing to train.")


def _describe_perceptual(loss_cfg) -> str:
  """'none', or e.g. 'dino(weight=1.0, phases=finetune, examples=8)'."""
  phases = [ph for ph in PHASES if pixel_objective.perceptual_active(loss_cfg, ph)]
  if not phases:
    return "none"
  examples = int(loss_cfg.perc_examples) or "all"
  every = pixel_objective.perceptual_every(loss_cfg)
  return (
    f"{loss_cfg.perceptual}(weight={float(loss_cfg.perc_weight)}, phases={'+'.join(phases)}, "
    f"examples={examples}" + (f", every={every} steps)" if every > 1 else ")")
  )


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
# Exports.
# ----------------------------------------------------------------------------------------------


def is_complete(ctx: StageContext) -> bool:
  return (ctx.stage_dir(NAME) / RESULTS).exists()


# ----------------------------------------------------------------------------------------------
# Training data.
# ----------------------------------------------------------------------------------------------


def _cache_source(ctx: StageContext, split_key: str, encoder_meta: dict[str, Any]):
  return feature_cache.feature_cache_source(
    ctx.upstream, ctx.config, split_key, encoder_meta, "pixel"
  )


def _make_data_iter_fn(
  ctx: StageContext, per_process: int, encoder_meta: dict[str, Any]
) -> Callable[[], Any]:
  config = ctx.config
  if config.pixel.input == "cache":
    if config.data.get("random_flip"):
      logging.warning("pixel: input='cache' reads unaugmented features; data.random_flip ignored.")
    paired = paired_cache.PairedCacheSource(
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

  return lambda: pipeline.make_train_image_iter(config, per_process)


# ----------------------------------------------------------------------------------------------
# Phases.
# ----------------------------------------------------------------------------------------------


def _loss_curve(ctx: StageContext, phase: str) -> dict[str, float]:
  """`{phase}_train_loss_first`, `..._last` and `{phase}_train_psnr_last` of a phase's log."""
  stage_dir = ctx.workdir / phase_stage(phase)
  out = {f"{phase}_{k}": v for k, v in train_metrics.logged_loss_curve(stage_dir).items()}
  psnr = train_metrics.logged_loss_curve(stage_dir, key="train/psnr")
  if out and psnr:
    out[f"{phase}_train_psnr_last"] = psnr["train_loss_last"]
  return out


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """What the phases, the evaluation and the exports of one stage run share."""

  ctx: StageContext
  spec: EncoderSpec
  encoder_params: Any
  encoder_meta: dict[str, Any]
  decoder_cfg: pd.PixelDecoderConfig
  image_size: tuple[int, int]
  models: PixelModels
  fns: inference.InferenceFns
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
    """Collective (every process calls it; the save is)."""
    config = self.ctx.config
    meta = {
      "model": "pixel_decoder",
      "config": self.decoder_cfg.to_dict(),
      "phase": phase,
      "weights": state.final_weights,
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
    artifacts.replace_export(directory, decoder_params, meta)


def _setup(ctx: StageContext) -> _Run:
  config = ctx.config
  p = config.pixel
  check_config(config)
  encoder_params, spec, encoder_meta = artifacts.load_frozen_encoder(ctx.encoder_dir, ctx.config)
  decoder_cfg = decoder_config(config, spec)
  image_size = _data_image_size(config)
  fae_dir = artifacts.export_dir(ctx.input_root("fae"), "fae")
  fae = None
  if artifacts.export_exists(fae_dir):
    fae = artifacts.load_fae_for_encoder(fae_dir, encoder_meta["fingerprint"])
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
  models = PixelModels(
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
    fns=inference.make_inference_fns(spec, fae_cfg, decoder_cfg, image_size, **dtypes),
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
  start = {}
  if previous is not None:
    # The phase's own step keys: `fold_in(key(seed), phase index)`.
    start_params, described = previous
    logging.info("pixel/%s: starts from %s.", phase, described)
    start = {
      "init_params": start_params,
      "step_key": jax.random.fold_in(jax.random.key(config.seed), PHASES.index(phase)),
    }
  eval_fn = None
  if int(train_cfg.eval_every) > 0:
    kind = "features" if phase == "noisy" else "full"

    def eval_fn(state):
      params = state.final_params()
      metrics, _ = reconstruction.evaluate_reconstructions(
        config,
        r.fns,
        encoder_params=r.encoder_params,
        paths={kind: (kind, multihost.gather(params["decoder"]))},
        fae_params=fae_params,
      )
      return metrics

  return loop.train(
    workdir=ctx.workdir,
    stage=phase_stage(phase),
    config=train_cfg,
    mesh=ctx.mesh,
    init_params_fn=r.init_params,
    loss_fn=pixel_objective.make_loss_fn(config.pixel, phase, r.models),
    data_iter_fn=data_iter_fn,
    seed=config.seed,
    flops_per_example=pd.pixel_decoder_flops_per_example(r.decoder_cfg),
    eval_fn=eval_fn,
    extra_args=(frozen,),
    saved_config=config,
    loss_takes_step=True,
    **start,
  )


def _write_grids(r: _Run, pairs: dict[str, tuple[np.ndarray, np.ndarray]], step: int, metrics):
  """PNG files and TensorBoard images of the grids; returns `{report key: png path}`."""
  out = {}
  writer = metric_writers.create_default_writer(r.stage_dir)
  for name, png in (("full", GRID_PNG), ("noisy_features", GRID_NOISY_PNG)):
    if name not in pairs:
      continue
    grid = reconstruction.reconstruction_grid(*pairs[name])
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
    final, weights = state.final_params(), state.final_weights
    # The next phase takes the decoder's average and the discriminator's raw weights (the
    # discriminator was trained against the raw decoder; its average never played).
    start = {"decoder": final["decoder"]}
    if "disc" in state.params:
      start["disc"] = state.params["disc"]
    previous = (start, {"phase": phase, "step": int(state.step), "decoder_weights": weights})
    finals[phase] = multihost.gather(final["decoder"])  # sharded over every host's devices
    if phase == "noisy":
      r.export(r.stage_dir / artifacts.PIXEL_EXPORT_NOISY, finals[phase], state, phase)
    if phase == "finetune" or int(p.finetune.train.num_steps) <= 0:  # the final decoder
      r.export(r.stage_dir / artifacts.EXPORT, finals[phase], state, phase)
    results.update(_loss_curve(ctx, phase))
    del state
    faults.point("pixel:between_phases", phase)

  logging.info("pixel: evaluating on the held-out split")
  final_decoder = finals.get("finetune", finals.get("noisy"))
  paths = {"noisy_features": ("features", finals.get("noisy", final_decoder))}
  if r.fae is not None:
    paths["full"] = ("full", final_decoder)
    if len(finals) == 2:
      paths["full_before_finetune"] = ("full", finals["noisy"])
  metrics, pairs = reconstruction.evaluate_reconstructions(
    config,
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
  if multihost.is_primary() and pairs:
    total_steps = sum(results.get(f"steps_{phase}", 0) for phase in PHASES)
    scalars = {k: v for k, v in metrics.items() if k != "eval_examples"}
    results.update(_write_grids(r, pairs, total_steps, scalars))
  results.update(
    {
      "image_size": list(r.image_size),
      "decoder_output_size": list(r.decoder_cfg.image_size),
      "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(final_decoder))),
      "perceptual": _describe_perceptual(p.loss),
      "gan": r.models.disc is not None,
      "noise": f"{p.noise.mode}(sigma={p.noise.sigma}, tau={p.noise.tau})",
      "encoder_random": bool(r.encoder_meta["source"].get("random")),
      "export": str(r.stage_dir / artifacts.EXPORT),
    }
  )
  if "noisy" in finals:
    results["export_noisy"] = str(r.stage_dir / artifacts.PIXEL_EXPORT_NOISY)
  if multihost.is_primary():
    write_json_atomic(r.stage_dir / RESULTS, results)
  logging.info("pixel results: %s", json.dumps(results, sort_keys=True))
  return results
