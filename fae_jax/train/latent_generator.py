"""Training a generator on the latent cache: what the `diffusion` and `flow` stages share (the
latent data path, the train loop call and the export).

Each step draws, per example, the original or the flipped posterior (probability 1/2; the
original only when the cache has no flips), samples `z = mean + std * eps` and normalises it per
channel with `latents/stats.json` (inside the generator's loss, so the statistics enter the
jitted step as an argument). The trained weights (EMA when on) are exported once, as an Orbax
params checkpoint with a `model.json` that always carries the generator's config, the step and
the latent statistics needed to un-normalise samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from fae_jax import artifacts, multihost, sharding
from fae_jax.data import feature_cache, pipeline, sources
from fae_jax.train import loop
from fae_jax.train import metrics as train_metrics

LATENT_FIELDS = ("mean", "std", "mean_flip", "std_flip", "label")


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


def normalised_sample(
  batch: dict[str, jax.Array], rng: jax.Array, stats: dict[str, jax.Array]
) -> jax.Array:
  """`sample_latents` standardised per channel with the cache's statistics."""
  return (sample_latents(batch, rng) - stats["mean"]) / stats["std"]


def latent_geometry(
  workdir: epath.PathLike, config: ml_collections.ConfigDict
) -> tuple[tuple[int, int, int], int]:
  """`((h, w, c), num_classes)` of the latent cache in `workdir` and the dataset."""
  source = feature_cache.latent_source(workdir)
  return tuple(source.spec["mean"][0]), sources.num_classes(config.data)


def train_and_export(
  *,
  workdir: epath.Path,
  latents_root: epath.Path | None = None,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  stage: str,
  train_cfg: ml_collections.ConfigDict,
  init_params_fn: Callable[[jax.Array], Any],
  loss_fn: Callable[..., Any],
  flops_per_example: float,
  export_meta: dict[str, Any],
) -> dict[str, Any]:
  """Trains a generator on the latent cache and exports its final weights.

  `loss_fn(params, batch, rng, stats)` receives batches of `LATENT_FIELDS` and the per-channel
  statistics `{"mean", "std"}`; the latent cache is read from `latents_root` (default
  `workdir`; the upstream run's for sweep points). `export_meta` is merged into the export's `model.json` (with
  `weights`, `step` and `latent_stats`). Returns the stage's common report values (`steps`,
  `train_seconds`, `num_params` and the logged loss curve).
  """
  latents_root = workdir if latents_root is None else latents_root
  source = feature_cache.latent_source(latents_root)
  stats = feature_cache.load_latent_stats(latents_root)
  sharding.check_batch_divisible(int(train_cfg.batch_size), mesh, f"config.{stage}.train")
  per_process = int(train_cfg.batch_size) // jax.process_count()

  def data_iter_fn():
    ds = pipeline.make_cache_dataset(
      source, batch_size=per_process, seed=config.seed, data_config=config.data
    )
    return iter(ds.map(lambda b: {k: b[k] for k in LATENT_FIELDS if k in b}))

  t0 = time.time()
  state = loop.train(
    workdir=workdir,
    stage=stage,
    config=train_cfg,
    mesh=mesh,
    init_params_fn=init_params_fn,
    loss_fn=loss_fn,
    data_iter_fn=data_iter_fn,
    seed=config.seed,
    flops_per_example=flops_per_example,
    extra_args=({"mean": stats["mean"], "std": stats["std"]},),
    saved_config=config,
  )
  seconds = time.time() - t0
  final = state.final_params()
  export_dir = artifacts.export_dir(workdir, stage)
  # Collective save; one decision whether it is already there (a resumed run).
  exists = multihost.decide_once(
    f"{stage}:export-exists", lambda: artifacts.export_exists(export_dir)
  )
  if not exists:
    artifacts.save_export(
      export_dir,
      final,
      {
        **export_meta,
        "weights": state.final_weights,
        "step": int(state.step),
        "latent_stats": {k: np.asarray(v).tolist() for k, v in stats.items()},
      },
    )
  return {
    "steps": int(state.step),
    "train_seconds": round(seconds, 1),
    "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(final))),
    **train_metrics.logged_loss_curve(epath.Path(workdir) / stage),
  }
