"""Stage `diffusion`: a SiT/LightningDiT flow-matching generator on the cached FAE latents.

Each step draws a normalised posterior sample (`fae_jax.train.latent_generator`) and applies the
flow-matching objective (`fae_jax.flow_matching.objective`: linear path, t = 1 is noise, velocity
target, uniform or logit-normal time with the shift) to the network (`fae_jax.models.dit`) with
class-label dropout for guidance. The network, the objective and the sampler are separate
modules; this stage only wires them to the data and the train loop.

Outputs in `<workdir>/diffusion/`: TensorBoard events, `train_log.jsonl`, `checkpoints/`,
`export/` (EMA weights + `model.json` with the DitConfig, the latent statistics and the
objective's time settings). Complete when `export/model.json` exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fae_jax import artifacts
from fae_jax.flow_matching import objective
from fae_jax.flow_matching import path as fm_path
from fae_jax.models import dit as dit_model
from fae_jax.stages.context import StageContext
from fae_jax.train import latent_generator as generator

NAME = "diffusion"


def time_shift(config: ml_collections.ConfigDict) -> float:
  """The shift s >= 1 from `shift` or the paper's `timestep_shift` (s = 1 / ts)."""
  obj = config.diffusion.objective
  return fm_path.resolve_shift(obj.get("shift"), obj.get("timestep_shift"))


def model_config(
  config: ml_collections.ConfigDict, latent_shape: tuple[int, int, int], num_classes: int
) -> dit_model.DitConfig:
  m = {k: v for k, v in config.diffusion.model.items() if v is not None}
  variant = m.pop("variant")
  lightning = m.pop("lightning")
  h, w, c = latent_shape
  if h != w:
    raise ValueError(f"The generator needs a square latent grid, got {h}x{w}.")
  return dit_model.DitConfig.from_variant(
    variant, in_channels=c, input_size=h, lightning=lightning, num_classes=num_classes, **m
  )


def is_complete(ctx: StageContext) -> bool:
  return artifacts.export_exists(artifacts.export_dir(ctx.workdir, NAME))


def make_loss_fn(model: dit_model.Dit, config: ml_collections.ConfigDict):
  obj = config.diffusion.objective
  shift = time_shift(config)

  def loss_fn(params, batch, rng, stats):
    k_z, k_drop, k_fm = jax.random.split(rng, 3)
    x = generator.normalised_sample(batch, k_z, stats)

    def velocity(xt, t, y):
      return model.apply({"params": params}, xt, t, y, train=True, rngs={"dropout": k_drop})

    return objective.flow_matching_loss(
      velocity,
      x,
      batch["label"],
      k_fm,
      time_dist=obj.time_dist,
      shift=shift,
      mean=float(obj.logit_mean),
      std=float(obj.logit_std),
      cos_weight=float(obj.cos_weight),
    )

  return loss_fn


def run(ctx: StageContext) -> dict:
  config = ctx.config
  latent_shape, num_classes = generator.latent_geometry(ctx.input_root("latents"), config)
  mcfg = model_config(config, latent_shape, num_classes)
  model = dit_model.Dit(mcfg, dtype=jnp.dtype(config.diffusion.dtype))
  x0 = jnp.zeros((1, *latent_shape), jnp.float32)

  def init_params(rng):
    return model.init(
      {"params": rng}, x0, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]

  obj = config.diffusion.objective
  result = generator.train_and_export(
    workdir=ctx.workdir,
    latents_root=ctx.input_root("latents"),
    config=config,
    mesh=ctx.mesh,
    stage=NAME,
    train_cfg=config.diffusion.train,
    init_params_fn=init_params,
    loss_fn=make_loss_fn(model, config),
    flops_per_example=dit_model.dit_flops_per_example(mcfg),
    export_meta={
      "model": "dit",
      "config": mcfg.to_dict(),
      "time_shift": time_shift(config),
      "time_dist": obj.time_dist,
    },
  )
  model_name = f"{config.diffusion.model.variant} (lightning={config.diffusion.model.lightning})"
  return {**result, "model": model_name}
