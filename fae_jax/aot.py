"""Ahead-of-time compilation of every stage's step for a real TPU slice, from a CPU machine.

  python -m fae_jax.aot --config=configs/imagenet.py --topology=v5p:4x4x4 [--stages=fae,flow]

With `libtpu` installed (the `test` extra pins it), `jax.experimental.topologies` describes the
devices of a TPU slice that is not attached (v4, v5e, v5p, v6e, up to 1,024 chips). Each stage's
real jitted step (the train loop's `make_train_step` around the stage's own loss, or the
inference function) is lowered with abstract inputs (`jax.ShapeDtypeStruct`s carrying the
config's mesh shardings and global batch; no parameter is ever materialised) and compiled by
the TPU compiler. The report has, per step:

  * parameters (trained, or used for inference), bytes per device from XLA's memory analysis
    (arguments, outputs, temporaries, generated code; peak = arguments + outputs - aliased +
    temporaries + code) against the chip's HBM, and whether it fits;
  * FLOPs per step from XLA's cost analysis (per device, times the device count) beside the
    analytic count the train loop's MFU uses (3 x forward of the trained model; frozen encoders
    and losses are not in it, so XLA's number is higher where they run);
  * the collectives of the optimized HLO (kind, count, bytes per device);
  * a roofline: step time = max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per device
    (chip figures: `fae_jax.tpu_chips`), and images/s at that time.

A stage that does not fit makes the command exit with status 1 and a message naming the fix.
XLA counts the body of a while loop once (the samplers' token loops), so their FLOPs are per
loop iteration, not per call.
"""

from __future__ import annotations

import os

# libtpu takes a process lock; the AOT compiler needs no TPU, so several processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from fae_jax import artifacts, tpu_chips  # noqa: E402
from fae_jax import sharding as sharding_lib  # noqa: E402
from fae_jax.aot_compile import (  # noqa: E402
  StepReport,
  StepSpec,
  _gib,
  compile_step,
  format_table,
  topology_devices,
)
from fae_jax.data import feature_cache, sources  # noqa: E402
from fae_jax.flow_matching import guidance  # noqa: E402
from fae_jax.losses import fae as fae_losses  # noqa: E402
from fae_jax.losses import pixel_decoder as pixel_objective  # noqa: E402
from fae_jax.models import dinov2, tarflow  # noqa: E402
from fae_jax.models import discriminator as disc_model  # noqa: E402
from fae_jax.models import dit as dit_model  # noqa: E402
from fae_jax.models import fae as fae_model  # noqa: E402
from fae_jax.models import pixel_decoder as pd  # noqa: E402
from fae_jax.models.encoder import (  # noqa: E402
  EncoderSpec,
  encode_images,
  images_to_model_range,
)

# The stages own the mapping config -> model config and the latent generators' losses.
from fae_jax.stages import diffusion as diffusion_stage  # noqa: E402
from fae_jax.stages import fae as fae_stage  # noqa: E402
from fae_jax.stages import flow as flow_stage  # noqa: E402
from fae_jax.stages import pixel as pixel_stage  # noqa: E402
from fae_jax.tarflow import sampler as flow_sampler  # noqa: E402
from fae_jax.train import checkpoint as ckpt_lib  # noqa: E402
from fae_jax.train import loop, optim  # noqa: E402
from fae_jax.train import state as train_state  # noqa: E402

# Steps in report order; `--stages` picks a subset.
STEPS = (
  "encode",
  "fae",
  "fae_encoder",
  "pixel",
  "pixel_finetune",
  "diffusion",
  "flow",
  "diffusion_sample",
  "flow_sample",
)
# ----------------------------------------------------------------------------------------------
# The stages' steps, built from the config with abstract inputs.
# ----------------------------------------------------------------------------------------------


def _count(tree: Any) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _abstract_frozen(tree: Any, mesh: Mesh, train_cfg: ml_collections.ConfigDict) -> tuple:
  """Frozen weights as abstract arguments placed like the train loop places `extra_args`."""
  shardings = sharding_lib.param_shardings(
    tree, mesh, tuple(train_cfg.get("fsdp_rules", (".*",))), int(train_cfg.fsdp_min_size)
  )
  return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), tree, shardings), shardings


def _batch(mesh: Mesh, fields: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
  sh = sharding_lib.batch_sharding(mesh)
  return {k: _sds(shape, dtype, sh) for k, (shape, dtype) in fields.items()}


def _remat_fix(config: ml_collections.ConfigDict, key: str) -> str | None:
  """`key` for the "does not fit" message while that model's remat is off; None once it is on
  (the message then names only accumulation and the batch)."""
  node = config
  for part in key.split("."):
    node = getattr(node, part)
  return None if bool(node) else key


def _train_step(
  name: str,
  *,
  mesh: Mesh,
  train_cfg: ml_collections.ConfigDict,
  prefix: str,
  init_params_fn: Callable,
  loss_fn: Callable,
  batch: dict[str, tuple[tuple[int, ...], Any]],
  frozen: Any = None,
  flops_per_example: float,
  loss_takes_step: bool = False,
  remat_key: str | None = None,
) -> StepSpec:
  """The train loop's jitted step around `loss_fn`, with abstract state, batch and frozen args."""
  tx, schedule = optim.make_optimizer(train_cfg)
  abstract, shardings = train_state.abstract_train_state(
    config=train_cfg, mesh=mesh, init_params_fn=init_params_fn, tx=tx
  )
  extra, extra_shardings = ((), ())
  if frozen is not None:
    frozen_args, frozen_sh = _abstract_frozen(frozen, mesh, train_cfg)
    extra, extra_shardings = (frozen_args,), (frozen_sh,)
  step = loop.make_train_step(
    loss_fn=loss_fn,
    tx=tx,
    schedule=schedule,
    config=train_cfg,
    shardings=shardings,
    mesh=mesh,
    extra_shardings=extra_shardings,
    loss_takes_step=loss_takes_step,
  )
  global_batch = int(train_cfg.batch_size)
  sharding_lib.check_batch_divisible(global_batch, mesh, f"config.{prefix}")
  fix = {"train": prefix}
  if remat_key:
    fix["remat"] = remat_key
  return StepSpec(
    name=name,
    fn=step,
    args=(
      ckpt_lib.abstract_with_shardings(abstract, shardings),
      _batch(mesh, {k: ((global_batch, *s), d) for k, (s, d) in batch.items()}),
      extra,
    ),
    num_params=_count(abstract.params),
    global_batch=global_batch,
    analytic_flops=3.0 * flops_per_example * global_batch,
    images_per_call=global_batch,
    fix_keys=fix,
  )


@dataclasses.dataclass(frozen=True)
class _Geometry:
  spec: EncoderSpec
  image_size: int
  latent_shape: tuple[int, int, int]
  num_classes: int


def _geometry(config: ml_collections.ConfigDict) -> _Geometry:
  backbone = dinov2.Dinov2Config.from_variant(
    config.encoder.variant, num_registers=int(config.encoder.num_registers)
  )
  spec = artifacts.encoder_spec(config, backbone)
  size = config.data.get("image_size") or config.data.get("synthetic_image_size") or 256
  if config.data.name.startswith("tfds:imagenet"):
    num_classes = 1000  # no dataset needed to know it
  else:
    num_classes = sources.num_classes(config.data)
  h, w = spec.grid
  return _Geometry(spec, int(size), (h, w, int(config.fae.model.latent_dim)), num_classes)


def _encoder_params(geo: _Geometry) -> Any:
  """Abstract DINOv2 backbone params (float32, as the converter writes them)."""
  images = jnp.zeros((1, geo.spec.image_size, geo.spec.image_size, 3), jnp.float32)
  model = dinov2.Dinov2(geo.spec.backbone)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


def encoder_flops_per_example(geo: _Geometry, params: Any) -> float:
  """Analytic forward FLOPs of the frozen encoder: 2 x tokens x matmul weights + attention."""
  c = geo.spec.backbone
  n = geo.spec.num_tokens + c.num_prefix_tokens
  kernels = [a for a in jax.tree.leaves(params) if a.ndim == 2 and min(a.shape) > 64]
  return 2.0 * n * sum(np.prod(a.shape) for a in kernels) + 4.0 * c.depth * n * n * c.width


def _images(geo: _Geometry) -> dict[str, tuple[tuple[int, ...], Any]]:
  return {"image": ((geo.image_size, geo.image_size, 3), jnp.uint8)}


def build_step(name: str, config: ml_collections.ConfigDict, mesh: Mesh) -> StepSpec:
  """The `name` step (one of STEPS) of `config` on `mesh`, with abstract inputs."""
  geo = _geometry(config)
  spec = geo.spec
  enc_dtype = jnp.dtype(config.encoder.dtype)
  if name == "encode":
    params = _encoder_params(geo)
    train_cfg = config.fae.train  # the FSDP rule of the frozen encoder's first consumer
    frozen, frozen_sh = _abstract_frozen(params, mesh, train_cfg)
    batch_size = int(config.encode.batch_size)
    sharding_lib.check_batch_divisible(batch_size, mesh, "config.encode")
    fn = jax.jit(
      feature_cache.make_encode_fn(spec, enc_dtype),
      in_shardings=(frozen_sh, sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.batch_sharding(mesh),
    )
    images = _batch(mesh, {"image": ((batch_size, *_images(geo)["image"][0]), jnp.uint8)})
    return StepSpec(
      name=name,
      fn=fn,
      args=(frozen, images["image"]),
      num_params=_count(params),
      global_batch=batch_size,
      analytic_flops=encoder_flops_per_example(geo, params) * batch_size,
      images_per_call=batch_size,
      fix_keys={},
    )

  if name in ("fae", "fae_encoder"):
    mcfg = fae_stage.model_config(config, spec)
    dtype = jnp.dtype(config.fae.dtype)
    model = fae_model.Fae(mcfg, dtype=dtype)
    beta = float(config.fae.beta)
    x0 = jnp.zeros((1, spec.num_tokens, spec.feature_dim), jnp.float32)

    def init_params(rng):
      return model.init({"params": rng}, x0, rng)["params"]

    def on_features(params, x, rng):
      out = model.apply({"params": params}, x, rng)
      return fae_losses.fae_loss(x, out["x_hat"], out["mean"], out["logvar"], beta=beta)

    common = dict(
      mesh=mesh,
      train_cfg=config.fae.train,
      prefix="fae.train",
      init_params_fn=init_params,
      flops_per_example=fae_model.fae_flops_per_example(mcfg),
      remat_key=_remat_fix(config, "fae.model.remat"),
    )
    if name == "fae":

      def loss_cache(params, batch, rng):
        return on_features(params, batch["features"].astype(jnp.float32), rng)

      features = {"features": ((spec.num_tokens, spec.feature_dim), jnp.bfloat16)}
      return _train_step(name, loss_fn=loss_cache, batch=features, **common)

    def loss_encoder(params, batch, rng, frozen):
      x = encode_images(spec, frozen, images_to_model_range(batch["image"]), dtype=dtype)
      return on_features(params, jax.lax.stop_gradient(x), rng)

    return _train_step(
      name, loss_fn=loss_encoder, batch=_images(geo), frozen=_encoder_params(geo), **common
    )

  if name in ("pixel", "pixel_finetune"):
    phase = "noisy" if name == "pixel" else "finetune"
    decoder_cfg = pixel_stage.decoder_config(config, spec)
    fae_cfg = fae_stage.model_config(config, spec) if phase == "finetune" else None
    models = pixel_objective.PixelModels(
      spec=spec,
      decoder=pd.PixelDecoder(decoder_cfg, dtype=jnp.dtype(config.pixel.dtype)),
      disc=(
        disc_model.PatchDiscriminator(pixel_stage.discriminator_config(config))
        if pixel_stage.uses_gan(config)
        else None
      ),
      fae=fae_model.Fae(fae_cfg, dtype=jnp.dtype(config.fae.dtype)) if fae_cfg else None,
      encoder_dtype=enc_dtype,
    )

    def init_params(rng):
      rng_decoder, rng_disc = jax.random.split(rng)
      tokens = jnp.zeros((1, spec.num_tokens, spec.feature_dim), jnp.float32)
      params = {"decoder": models.decoder.init(rng_decoder, tokens)["params"]}
      if models.disc is not None:
        image = jnp.zeros((1, *decoder_cfg.image_size, 3), jnp.float32)
        params["disc"] = models.disc.init(rng_disc, image)["params"]
      return params

    p = config.pixel
    frozen = {}
    if p.input == "encoder" or (p.loss.perceptual == "dino" and float(p.loss.perc_weight) > 0):
      frozen["encoder"] = _encoder_params(geo)
    if phase == "finetune":
      x0 = jnp.zeros((1, spec.num_tokens, spec.feature_dim), jnp.float32)
      fae = models.fae
      frozen["fae"] = jax.eval_shape(
        lambda: fae.init({"params": jax.random.key(0)}, x0, jax.random.key(0))
      )["params"]
    if p.loss.perceptual == "lpips":
      raise ValueError(
        "fae_jax.aot: pixel.loss.perceptual='lpips' needs converted LPIPS weights; compile with "
        "--config.pixel.loss.perceptual=dino (the ImageNet default) or 'none'."
      )
    batch = dict(_images(geo))
    if p.input == "cache":
      batch["features"] = ((spec.num_tokens, spec.feature_dim), jnp.bfloat16)
    return _train_step(
      name,
      mesh=mesh,
      train_cfg=p[phase].train,
      prefix=f"pixel.{phase}.train",
      init_params_fn=init_params,
      loss_fn=pixel_objective.make_loss_fn(config.pixel, phase, models),
      batch=batch,
      frozen=frozen,
      flops_per_example=pd.pixel_decoder_flops_per_example(decoder_cfg),
      loss_takes_step=True,
      remat_key=_remat_fix(config, "pixel.model.remat"),
    )

  latent_fields = {
    k: (geo.latent_shape, jnp.bfloat16) for k in ("mean", "std", "mean_flip", "std_flip")
  }
  latent_fields["label"] = ((), jnp.int32)
  c = geo.latent_shape[-1]
  stats = {
    "mean": jax.ShapeDtypeStruct((c,), jnp.float32),
    "std": jax.ShapeDtypeStruct((c,), jnp.float32),
  }
  x0 = jnp.zeros((1, *geo.latent_shape), jnp.float32)
  y0 = jnp.zeros((1,), jnp.int32)

  if name in ("diffusion", "diffusion_sample"):
    mcfg = diffusion_stage.model_config(config, geo.latent_shape, geo.num_classes)
    model = dit_model.Dit(mcfg, dtype=jnp.dtype(config.diffusion.dtype))

    def init_params(rng):
      return model.init({"params": rng}, x0, jnp.zeros((1,)), y0, train=False)["params"]

    flops = dit_model.dit_flops_per_example(mcfg)
    if name == "diffusion":
      return _train_step(
        name,
        mesh=mesh,
        train_cfg=config.diffusion.train,
        prefix="diffusion.train",
        init_params_fn=init_params,
        loss_fn=diffusion_stage.make_loss_fn(model, config),
        batch=latent_fields,
        frozen=stats,
        flops_per_example=flops,
        remat_key=_remat_fix(config, "diffusion.model.remat"),
      )
    params = jax.eval_shape(init_params, jax.random.key(0))
    return _sampler_step(
      name,
      config,
      mesh,
      params,
      geo,
      flops,
      lambda prm, x, t, y: model.apply({"params": prm}, x, t, y, train=False),
    )

  if name in ("flow", "flow_sample"):
    mcfg = flow_stage.model_config(config, geo.latent_shape, geo.num_classes)
    model = tarflow.TarFlow(mcfg)

    def init_params(rng):
      return model.init({"params": rng}, x0, y0)["params"]

    flops = tarflow.flow_flops_per_example(mcfg)
    if name == "flow":
      return _train_step(
        name,
        mesh=mesh,
        train_cfg=config.flow.train,
        prefix="flow.train",
        init_params_fn=init_params,
        loss_fn=flow_stage.make_loss_fn(model),
        batch=latent_fields,
        frozen=stats,
        flops_per_example=flops,
        remat_key=_remat_fix(config, "flow.model.remat"),
      )
    params = jax.eval_shape(init_params, jax.random.key(0))
    return _flow_sampler(name, config, mesh, params, model, flops)
  raise ValueError(f"fae_jax.aot: unknown step {name!r}; choose from {STEPS}.")


def _inference_params(params: Any, mesh: Mesh, train_cfg) -> tuple[Any, Any]:
  return _abstract_frozen(params, mesh, train_cfg)


def _sampler_step(name, config, mesh, params, geo, flops, velocity_fn) -> StepSpec:
  """One guided step of the diffusion sampler (the evaluation's guided ODE, a guided time)."""
  e = config.evaluate
  batch = int(e.batch_size)
  sharding_lib.check_batch_divisible(batch, mesh, "config.evaluate")
  bands = guidance.normalize_bands(e.guided.bands)
  t_guided = float(bands[0][0] + bands[0][1]) / 2 if bands else 0.5
  null = geo.num_classes
  prm, prm_sh = _inference_params(params, mesh, config.diffusion.train)
  bsh = sharding_lib.batch_sharding(mesh)

  def step(p, x, y):
    def velocity(xt, t, yy):
      return velocity_fn(p, xt, t, yy)

    v = guidance.guided_velocity(velocity, x, jnp.float32(t_guided), y, null, bands)
    return x - v / float(e.guided.num_steps)

  fn = jax.jit(step, in_shardings=(prm_sh, bsh, bsh), out_shardings=bsh)
  passes = 2 if bands else 1
  return StepSpec(
    name=name,
    fn=fn,
    args=(prm, _sds((batch, *geo.latent_shape), jnp.float32, bsh), _sds((batch,), jnp.int32, bsh)),
    num_params=_count(params),
    global_batch=batch,
    analytic_flops=passes * flops * batch,
    images_per_call=batch / int(e.guided.num_steps),
    fix_keys={},
  )


def _flow_sampler(name, config, mesh, params, model, flops) -> StepSpec:
  """The flow's whole guided sample (KV-cached inverse + denoise) of one evaluation batch."""
  e = config.evaluate
  batch = int(e.batch_size)
  sharding_lib.check_batch_divisible(batch, mesh, "config.evaluate")
  s = config.flow.sample
  scale = float(s.guidance_scale)
  fn = flow_sampler.make_sample_fn(
    model,
    mesh=mesh,
    temperature=float(s.temperature),
    guidance=None if scale == 1.0 else scale,
    cache=bool(s.cache),
    denoise_step=bool(s.denoise),
  )
  prm, _ = _inference_params(params, mesh, config.flow.train)
  bsh = sharding_lib.batch_sharding(mesh)
  # Raw uint32 key data (what `jax.random` also takes), replicated.
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
  passes = 2 if scale != 1.0 else 1
  return StepSpec(
    name=name,
    fn=fn,
    args=(prm, key, _sds((batch,), jnp.int32, bsh)),
    num_params=_count(params),
    global_batch=batch,
    analytic_flops=passes * flops * batch,
    images_per_call=batch,
    fix_keys={},
  )


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def run(
  config: ml_collections.ConfigDict,
  topology: str,
  steps: Sequence[str] = STEPS,
  log: Callable[[str], None] = print,
) -> tuple[list[StepReport], Mesh]:
  """Compiles `steps` of `config` for `topology`; returns the reports and the mesh."""
  unknown = sorted(set(steps) - set(STEPS))
  if unknown:
    raise ValueError(f"fae_jax.aot: unknown steps {unknown}; choose from {list(STEPS)}.")
  chip = tpu_chips.chip_by_name(topology)
  devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices)
  reports = []
  for name in steps:
    t0 = time.perf_counter()
    spec = build_step(name, config, mesh)
    report = compile_step(spec, chip, mesh.devices.size)
    reports.append(report)
    log(
      f"{name}: compiled in {time.perf_counter() - t0:.0f} s, {_gib(report.peak_bytes)} GiB "
      f"per device ({'fits' if report.fits else 'DOES NOT FIT'})\n"
      + format_table([report], topology, mesh).splitlines()[-1]
    )
  return reports, mesh


def summary(reports: Sequence[StepReport], topology: str, mesh: Mesh) -> tuple[str, bool]:
  """The table, followed by a fix for each step that does not fit; and whether all fit."""
  text = format_table(reports, topology, mesh)
  fixes = [r.fix(mesh) for r in reports if not r.fits]
  if fixes:
    text += "\n\nDoes not fit:\n" + "\n".join(f"  * {f}" for f in fixes)
  return text, not fixes


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  steps = [s.strip() for s in _STAGES.value.split(",") if s.strip()] if _STAGES.value else STEPS
  reports, mesh = run(config, _TOPOLOGY.value, steps)
  text, all_fit = summary(reports, _TOPOLOGY.value, mesh)
  print(text)
  if not all_fit:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU slice, e.g. v5e:16x16, v6e:8x8.")
  _STAGES = flags.DEFINE_string("stages", "", f"Comma-separated subset of {','.join(STEPS)}.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
