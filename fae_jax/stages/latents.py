"""Stage `latents`: the frozen encoder + FAE adapter over the training split -> `latents/train/`.

For every image AND its horizontal flip (`config.latents.flip`, default on; the flip is encoded
by the frozen encoder, since the features of a flipped image are not the flipped features) the
cache holds the posterior mean and
standard deviation, bfloat16 `[h, w, c]` each (DESIGN.md, "Latent cache"). Generators sample
`z = mean + std * eps` per step, picking the flip with probability 1/2, and train on per-channel
normalised latents; `stats.json` holds those per-channel statistics:

  mean_c = E[mean]                     (over images, flips and positions)
  std_c  = sqrt(Var[mean] + E[std^2])  (the standard deviation of sampled z)

Resumable at shard granularity (`fae_jax.data.feature_cache.write_image_cache`); complete when the
cache manifest and `stats.json` exist.
"""

from __future__ import annotations

import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fae_jax import artifacts, multihost
from fae_jax.data import array_cache, feature_cache
from fae_jax.fileio import write_json_atomic
from fae_jax.models import fae as fae_model
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range
from fae_jax.stages.context import StageContext

NAME = feature_cache.LATENTS_STAGE
FIELDS = ("mean", "std", "mean_flip", "std_flip")


def is_complete(ctx: StageContext) -> bool:
  return (
    array_cache.is_complete(feature_cache.latent_cache_dir(ctx.workdir))
    and feature_cache.latent_stats_path(ctx.workdir).exists()
  )


def make_posterior_fn(
  spec: EncoderSpec, fcfg: fae_model.FaeConfig, dtype, flip: bool = True
) -> Any:
  """`((encoder params, FAE params), uint8 images) -> {mean, std[, mean_flip, std_flip]}`."""
  model = fae_model.Fae(fcfg, dtype=dtype)

  def posterior(params, images):
    enc_params, fae_params = params
    x = encode_images(spec, enc_params, images_to_model_range(images), dtype=dtype)
    mean, logvar = model.apply({"params": fae_params}, x, method=fae_model.Fae.encode)
    return mean, fae_model.std(logvar)

  def fn(params, images):
    mean, std = posterior(params, images)
    out = {"mean": mean, "std": std}
    if flip:
      out["mean_flip"], out["std_flip"] = posterior(params, images[:, :, ::-1])
    return {k: v.astype(jnp.bfloat16) for k, v in out.items()}

  return fn


def write_from_feature_cache(
  ctx: StageContext,
  features: array_cache.CacheSource,
  fcfg: fae_model.FaeConfig,
  fae_params: Any,
  metadata: dict[str, Any],
) -> dict[str, Any]:
  """Posteriors of the cached (bfloat16) features of the `encode` stage: no encoder pass.

  Used when flips are off and the train feature cache exists; shard layout and resume behaviour
  are those of the cache writer (shard i of the latents = shard i of the features).
  """
  model = fae_model.Fae(fcfg, dtype=jnp.dtype(ctx.config.fae.dtype))

  @jax.jit
  def posterior(params, x):
    mean, logvar = model.apply({"params": params}, x, method=fae_model.Fae.encode)
    return mean.astype(jnp.bfloat16), fae_model.std(logvar).astype(jnp.bfloat16)

  h, w = fcfg.grid
  shape = ((h, w, fcfg.latent_dim), "bfloat16")
  spec = {"mean": shape, "std": shape, "label": ((), "int32"), "id": ((), "int64")}
  spec["valid"] = ((), "uint8")
  writer = array_cache.CacheWriter(
    feature_cache.latent_cache_dir(ctx.workdir),
    spec,
    len(features),
    int(features.manifest["examples_per_shard"]),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    metadata=metadata,
    stage=NAME,
  )
  bs = int(ctx.config.encode.batch_size)
  done = 0
  logging.info(
    "latents train: process %d of %d owns shards %s of the feature cache (same shards here).",
    jax.process_index(),
    jax.process_count(),
    list(range(writer.process_index, writer.num_shards, writer.process_count)),
  )
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    with writer.open_shard(shard) as out:
      for i in range(start, end, bs):
        recs = features.__getitems__(list(range(i, min(i + bs, end))))
        x = np.stack([r["features"] for r in recs]).astype(np.float32)
        n = len(recs)
        if n < bs:  # one compiled shape
          x = np.concatenate([x, np.zeros((bs - n, *x.shape[1:]), x.dtype)])
        mean, std = (np.asarray(a)[:n] for a in posterior(fae_params, x))
        out.write(
          {
            "mean": mean,
            "std": std,
            **{k: np.stack([r[k] for r in recs]) for k in ("label", "id", "valid")},
          }
        )
        done += n
  multihost.barrier("latents:train:written")
  writer.finalize()  # process 0: the manifest
  multihost.barrier("latents:train:finalized")
  return {"num_examples": len(features), "encoded": int(multihost.sum_over_processes(done)[0])}


def channel_stats(source: Any, batch_size: int = 256) -> dict[str, list[float]]:
  """Per-channel mean and std of sampled latents over the cache (flips included), in float64."""
  n = 0
  s1 = s2 = var_sum = None
  for batch in grain.MapDataset.source(source).to_iter_dataset().batch(batch_size):
    keep = batch["valid"].astype(bool)
    pairs = (
      [("mean", "std"), ("mean_flip", "std_flip")] if "mean_flip" in batch else [("mean", "std")]
    )
    for m_key, s_key in pairs:
      m = batch[m_key][keep].astype(np.float64)
      s = batch[s_key][keep].astype(np.float64)
      m = m.reshape(-1, m.shape[-1])
      s = s.reshape(-1, s.shape[-1])
      if s1 is None:
        s1 = np.zeros(m.shape[-1])
        s2 = np.zeros(m.shape[-1])
        var_sum = np.zeros(m.shape[-1])
      s1 += m.sum(0)
      s2 += (m**2).sum(0)
      var_sum += (s**2).sum(0)
      n += m.shape[0]
  if not n:
    raise ValueError("The latent cache holds no valid example.")
  mean = s1 / n
  var = s2 / n - mean**2 + var_sum / n
  return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 1e-12)).tolist(), "count": n}


def run(ctx: StageContext) -> dict:
  enc_params, spec, enc_meta = artifacts.load_frozen_encoder(ctx.encoder_dir, ctx.config)
  fae_params, fcfg, fae_meta = artifacts.load_fae_for_encoder(
    artifacts.export_dir(ctx.input_root("fae"), "fae"), enc_meta["fingerprint"]
  )
  dtype = jnp.dtype(ctx.config.encoder.dtype)
  h, w = fcfg.grid
  shape = ((h, w, fcfg.latent_dim), "bfloat16")
  flip = bool(ctx.config.latents.flip)
  fields = FIELDS if flip else FIELDS[:2]
  metadata = {
    "encoder_fingerprint": enc_meta["fingerprint"],
    "fae_step": int(fae_meta["step"]),
    "fae_weights": fae_meta["weights"],
    "dataset": ctx.config.data.name,
    "split": feature_cache.split_name(ctx.config, "train"),
    "data_image_size": ctx.config.data.image_size,
    "flip": flip,
  }
  features_dir = feature_cache.cache_dir(ctx.upstream, "train")
  # One decision: a host that does not (yet) see the feature cache must not take the other path.
  from_features = not flip and multihost.decide_once(
    "latents:from-features", lambda: array_cache.is_complete(features_dir)
  )
  if from_features:
    features = array_cache.CacheSource(
      features_dir, expected_metadata=feature_cache.cache_metadata(ctx.config, enc_meta, "train")
    )
    logging.info("latents: from the cached features in %s (no encoder pass)", features_dir)
    metadata["source"] = "feature_cache"
    t0 = time.time()
    result = write_from_feature_cache(ctx, features, fcfg, fae_params, metadata)
    # Hosts run in parallel: the job's rate is the summed count over the (shared) wall time.
    result["rate"] = result["encoded"] / max(time.time() - t0, 1e-9)
  else:
    result = feature_cache.write_image_cache(
      ctx.config,
      feature_cache.latent_cache_dir(ctx.workdir),
      "train",
      spec={k: shape for k in fields},
      metadata=metadata,
      compute_fn=make_posterior_fn(spec, fcfg, dtype, flip=flip),
      params=(enc_params, fae_params),
      what=NAME,
    )
  # Process 0 scans the cache once; every host gets its numbers. The file is written before
  # any host goes on (the next stage's `load_latent_stats` reads it on every host).
  stats = multihost.decide_once(
    "latents:stats", lambda: channel_stats(feature_cache.latent_source(ctx.workdir))
  )
  if multihost.is_primary():
    write_json_atomic(feature_cache.latent_stats_path(ctx.workdir), stats)
  multihost.barrier("latents:stats-written")
  logging.info(
    "latents: per-channel mean %s, std %s",
    np.round(stats["mean"], 3).tolist(),
    np.round(stats["std"], 3).tolist(),
  )
  return {
    "num_examples": int(result["num_examples"]),
    "images_per_second": float(result["rate"]),
    "latent_shape": [h, w, fcfg.latent_dim],
    "channel_std_mean": float(np.mean(stats["std"])),
    "channel_mean_abs": float(np.mean(np.abs(stats["mean"]))),
    "dir": str(feature_cache.latent_cache_dir(ctx.workdir)),
  }
