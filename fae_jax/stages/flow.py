"""Stage `flow`: a TarFlow/STARFlow normalizing flow on the cached FAE latents.

The same data path as the `diffusion` stage: each step draws, per example, the original or the
flipped posterior (probability 1/2), samples `z = mean + std * eps`, and normalises it per
channel with `latents/stats.json`. The objective (`fae_jax.tarflow.objective.flow_loss`) adds the
training noise `noise_sigma * eps`, drops labels to the null class for guidance, and minimises
the exact negative log-likelihood of the deep-shallow flow (`fae_jax.models.tarflow`). The
network, the objective and the sampler (`fae_jax.tarflow.sampler`) are separate modules; this
stage only wires them to the data and the train loop.

The loop logs the objective's metrics under `train/` (`train/bpd` is bits per dimension of the
noise-augmented, normalised latents; it can be negative and is comparable only between runs on
the same latents with the same `noise_sigma`).

Outputs in `<workdir>/flow/`: TensorBoard events, `train_log.jsonl`, `checkpoints/`, `export/`
(EMA weights + `model.json` with the TarFlowConfig and the latent statistics). Complete when
`export/model.json` exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fae_jax import artifacts
from fae_jax.models import tarflow
from fae_jax.stages.context import StageContext
from fae_jax.tarflow import objective
from fae_jax.train import latent_generator as generator
from fae_jax.train import metrics as train_metrics

NAME = "flow"
# TarFlowConfig fields that come from the latents and the dataset, never from config.flow.model.
DERIVED_FIELDS = ("input_size", "in_channels", "num_classes")


def model_config(
  config: ml_collections.ConfigDict, latent_shape: tuple[int, int, int], num_classes: int
) -> tarflow.TarFlowConfig:
  """TarFlowConfig from `config.flow.model` (+ `config.flow.dtype`) and the latent geometry."""
  m = config.flow.model.to_dict()
  derived = sorted(set(m) & set(DERIVED_FIELDS))
  if derived:
    raise ValueError(
      f"config.flow.model.{derived[0]} is derived from the latents and the dataset; remove it."
    )
  h, w, c = latent_shape
  if h != w:
    raise ValueError(f"The flow needs a square latent grid, got {h}x{w}.")
  return tarflow.TarFlowConfig.from_dict(
    {
      **m,
      "input_size": h,
      "in_channels": c,
      "num_classes": num_classes,
      "dtype": config.flow.dtype,
    }
  )


def is_complete(ctx: StageContext) -> bool:
  return artifacts.export_exists(artifacts.export_dir(ctx.workdir, NAME))


def make_loss_fn(model: tarflow.TarFlow):
  """`(params, batch, rng, stats) -> (nats per dim, metrics)` on normalised posterior samples."""

  def loss_fn(params, batch, rng, stats):
    k_z, k_flow = jax.random.split(rng)
    x = generator.normalised_sample(batch, k_z, stats)
    return objective.flow_loss(params, model, x, batch["label"], k_flow)

  return loss_fn


def run(ctx: StageContext) -> dict:
  config = ctx.config
  latent_shape, num_classes = generator.latent_geometry(ctx.input_root("latents"), config)
  mcfg = model_config(config, latent_shape, num_classes)
  model = tarflow.TarFlow(mcfg)
  x0 = jnp.zeros((1, *latent_shape), jnp.float32)

  def init_params(rng):
    return model.init({"params": rng}, x0, jnp.zeros((1,), jnp.int32))["params"]

  result = generator.train_and_export(
    workdir=ctx.workdir,
    latents_root=ctx.input_root("latents"),
    config=config,
    mesh=ctx.mesh,
    stage=NAME,
    train_cfg=config.flow.train,
    init_params_fn=init_params,
    loss_fn=make_loss_fn(model),
    # The loop counts a training step as 3x the forward.
    flops_per_example=tarflow.flow_flops_per_example(mcfg),
    export_meta={"model": "tarflow", "config": mcfg.to_dict()},
  )
  result["model"] = (
    f"TarFlow width {mcfg.width}, deep {mcfg.deep_depth} + {mcfg.num_shallow}x"
    f"{mcfg.shallow_depth} layers, patch {mcfg.patch_size}"
  )
  bpd = train_metrics.logged_loss_curve(ctx.stage_dir(NAME), key="train/bpd")
  if bpd:
    result["bits_per_dim_first"] = bpd["train_loss_first"]
    result["bits_per_dim"] = bpd["train_loss_last"]
  return result
