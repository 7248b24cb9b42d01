"""Stage `diffusion`: a SiT/LightningDiT flow-matching generator on the cached FAE latents.

Each step draws a normalised posterior sample (`fae_jax.stages.latent_generator`) and applies the
flow-matching objective (`fae_jax.flow_matching.objective`: linear path, t = 1 is noise, velocity
target, uniform or logit-normal time with the shift) to the network (`fae_jax.models.dit`) with
class-label dropout for guidance. The network, the objective and the sampler are separate
modules; this stage only wires them to the data and the train loop.

Outputs in `<workdir>/diffusion/`: TensorBoard events, `train_log.jsonl`, `checkpoints/`,
`export/` (EMA weights + `model.json` with the DitConfig, the latent statistics and the
objective's time settings). Complete when `export/model.json` exists.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fae_jax import params_store
from fae_jax.flow_matching import objective
from fae_jax.flow_matching import path as fm_path
from fae_jax.models import dit as dit_model
from fae_jax.stages import latent_generator as generator
from fae_jax.stages.context import StageContext

NAME = "diffusion"
EXPORT_META = generator.EXPORT_META


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


def load_export(workdir) -> tuple[Any, dit_model.DitConfig, dict[str, Any]]:
  directory = generator.StageDirs(workdir, NAME).export
  meta = params_store.load_meta(
    directory, EXPORT_META, "Run the `diffusion` stage first (add it to config.stages)."
  )
  return params_store.load_params(directory), dit_model.DitConfig.from_dict(meta["config"]), meta


def is_complete(ctx: StageContext) -> bool:
  return params_store.exists(generator.StageDirs(ctx.workdir, NAME).export, EXPORT_META)


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
  latent_shape, num_classes = generator.latent_geometry(ctx)
  mcfg = model_config(config, latent_shape, num_classes)
  model = dit_model.Dit(mcfg, dtype=jnp.dtype(config.diffusion.dtype))
  x0 = jnp.zeros((1, *latent_shape), jnp.float32)

  def init_params(rng):
    return model.init(
      {"params": rng}, x0, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]

  obj = config.diffusion.objective
  result = generator.train_and_export(
    ctx,
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
