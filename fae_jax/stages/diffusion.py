"""Stage `diffusion`: a SiT/LightningDiT flow-matching generator on the cached FAE latents.

Each step draws, per example, the original or the flipped posterior (probability 1/2), samples
`z = mean + std * eps`, normalises it per channel with `latents/stats.json`, and applies the
flow-matching objective (`fae_jax.flow_matching.objective`: linear path, t = 1 is noise, velocity
target, uniform or logit-normal time with the shift) to the network (`fae_jax.models.dit`) with
class-label dropout for guidance. The network, the objective and the sampler are separate
modules; this stage only wires them to the data and the train loop.

Outputs in `<workdir>/diffusion/`: TensorBoard events, `train_log.jsonl`, `checkpoints/`,
`export/` (EMA weights + `model.json` with the DitConfig, the latent statistics and the
objective's time settings). Complete when `export/model.json` exists.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fae_jax import params_store, sharding
from fae_jax.data import pipeline, sources
from fae_jax.flow_matching import objective
from fae_jax.flow_matching import path as fm_path
from fae_jax.models import dit as dit_model
from fae_jax.stages import latents as latents_stage
from fae_jax.stages.context import StageContext
from fae_jax.train import loop

NAME = "diffusion"
EXPORT = "export"
EXPORT_META = "model.json"
LATENT_FIELDS = ("mean", "std", "mean_flip", "std_flip", "label")


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
  directory = StageDirs(workdir).export
  meta = params_store.load_meta(
    directory, EXPORT_META, "Run the `diffusion` stage first (add it to config.stages)."
  )
  return params_store.load_params(directory), dit_model.DitConfig.from_dict(meta["config"]), meta


class StageDirs:
  def __init__(self, workdir):
    self.root = workdir / NAME
    self.export = self.root / EXPORT


def is_complete(ctx: StageContext) -> bool:
  return params_store.exists(StageDirs(ctx.workdir).export, EXPORT_META)


def sample_latents(batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """`z = mean + std * eps` of the original or the flipped image (probability 1/2 each; the
  original only when the cache was written without flips)."""
  k_flip, k_eps = jax.random.split(rng)
  mean, std = batch["mean"].astype(jnp.float32), batch["std"].astype(jnp.float32)
  if "mean_flip" in batch:
    flip = jax.random.bernoulli(k_flip, 0.5, (mean.shape[0], 1, 1, 1))
    mean = jnp.where(flip, batch["mean_flip"].astype(jnp.float32), mean)
    std = jnp.where(flip, batch["std_flip"].astype(jnp.float32), std)
  return mean + std * jax.random.normal(k_eps, mean.shape, jnp.float32)


def make_loss_fn(model: dit_model.Dit, config: ml_collections.ConfigDict):
  obj = config.diffusion.objective
  shift = time_shift(config)

  def loss_fn(params, batch, rng, stats):
    k_z, k_drop, k_fm = jax.random.split(rng, 3)
    x = (sample_latents(batch, k_z) - stats["mean"]) / stats["std"]

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
  source = latents_stage.latent_source(ctx)
  stats = latents_stage.load_stats(ctx.workdir)
  latent_shape = tuple(source.spec["mean"][0])
  num_classes = sources.num_classes(config.data)
  mcfg = model_config(config, latent_shape, num_classes)
  model = dit_model.Dit(mcfg, dtype=jnp.dtype(config.diffusion.dtype))
  train_cfg = config.diffusion.train
  sharding.check_batch_divisible(int(train_cfg.batch_size), ctx.mesh, "config.diffusion.train")
  per_process = int(train_cfg.batch_size) // jax.process_count()
  x0 = jnp.zeros((1, *latent_shape), jnp.float32)

  def init_params(rng):
    return model.init(
      {"params": rng}, x0, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]

  def data_iter_fn():
    ds = pipeline.make_cache_dataset(
      source, batch_size=per_process, seed=config.seed, data_config=config.data
    )
    return iter(ds.map(lambda b: {k: b[k] for k in LATENT_FIELDS if k in b}))

  t0 = time.time()
  state = loop.train(
    workdir=ctx.workdir,
    stage=NAME,
    config=train_cfg,
    mesh=ctx.mesh,
    init_params_fn=init_params,
    loss_fn=make_loss_fn(model, config),
    data_iter_fn=data_iter_fn,
    seed=config.seed,
    flops_per_example=dit_model.dit_flops_per_example(mcfg),
    extra_args=({"mean": stats["mean"], "std": stats["std"]},),
    saved_config=config,
  )
  seconds = time.time() - t0
  final = state.ema_params if state.ema_params is not None else state.params
  dirs = StageDirs(ctx.workdir)
  obj = config.diffusion.objective
  if jax.process_index() == 0 and not params_store.exists(dirs.export, EXPORT_META):
    params_store.save_params(
      dirs.export,
      final,
      {
        "model": "dit",
        "config": mcfg.to_dict(),
        "weights": "ema" if state.ema_params is not None else "raw",
        "step": int(state.step),
        "latent_stats": {k: np.asarray(v).tolist() for k, v in stats.items()},
        "time_shift": time_shift(config),
        "time_dist": obj.time_dist,
      },
      EXPORT_META,
    )
  curve = loop.logged_loss_curve(dirs.root)
  return {
    "steps": int(state.step),
    "train_seconds": round(seconds, 1),
    "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(final))),
    "model": f"{config.diffusion.model.variant} (lightning={config.diffusion.model.lightning})",
    **curve,
  }
