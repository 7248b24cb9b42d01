"""Stage `fae`: the adapter + Gaussian posterior + feature decoder, trained on frozen features.

Loss `||x_hat - x||^2 + beta * KL(q(z|x) || N(0, I))` (fae_jax.losses.fae). Input comes from the
feature cache of the `encode` stage (`config.fae.input = 'cache'`, the default) or from the frozen
encoder run inside the train step (`'encoder'`, no cache needed; the encoder's weights enter the
jitted step as sharded arguments).

Outputs in `<workdir>/fae/`: TensorBoard events, `checkpoints/` (resumable), `export/` (the EMA
weights, or the raw ones when EMA is off, as an inference checkpoint with `model.json`), and
`results.json` (held-out reconstruction and linear-probe metrics). The stage is complete when
`results.json` exists.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fae_jax import artifacts, multihost, sharding
from fae_jax.data import feature_cache, pipeline
from fae_jax.evaluation import features as feature_metrics
from fae_jax.evaluation import linear_probe
from fae_jax.fileio import write_json_atomic
from fae_jax.losses import fae as fae_losses
from fae_jax.models import fae as fae_model
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range
from fae_jax.stages.context import StageContext
from fae_jax.train import loop
from fae_jax.train import metrics as train_metrics

NAME = "fae"
RESULTS = "results.json"

# `config.fae.model` fields that are not FaeConfig fields (they come from the encoder).
_DERIVED = ("feature_dim", "grid")


def model_config(config: ml_collections.ConfigDict, spec: EncoderSpec) -> fae_model.FaeConfig:
  fields = dict(config.fae.model)
  for name in _DERIVED:
    fields.pop(name, None)
  return fae_model.FaeConfig(feature_dim=spec.feature_dim, grid=spec.grid, **fields)


def is_complete(ctx: StageContext) -> bool:
  return (ctx.stage_dir(NAME) / RESULTS).exists()


def _feature_source(ctx: StageContext, split_key: str, encoder_meta: dict[str, Any]):
  return feature_cache.feature_cache_source(
    ctx.upstream, ctx.config, split_key, encoder_meta, "fae"
  )


def _load_encoder(ctx: StageContext, need_params: bool):
  if need_params:
    return artifacts.load_frozen_encoder(ctx.encoder_dir, ctx.config)
  spec, meta = artifacts.load_encoder_spec(ctx.encoder_dir, ctx.config)
  return None, spec, meta


def _apply_fns(model: fae_model.Fae):
  @jax.jit
  def reconstruct(params, x):
    mean, logvar = model.apply({"params": params}, x, method=fae_model.Fae.encode)
    x_hat = model.apply({"params": params}, mean, method=fae_model.Fae.decode)
    return x_hat, mean

  return reconstruct


def evaluate(
  ctx: StageContext,
  model: fae_model.Fae,
  params: Any,
  encoder: tuple[Any, EncoderSpec, dict[str, Any]],
  *,
  probe: bool,
) -> dict[str, float]:
  """Held-out reconstruction (posterior mean) and, optionally, the linear probes."""
  cfg = ctx.config.fae.eval
  reconstruct = _apply_fns(model)
  bs = int(cfg.batch_size)

  def run(split_key, max_examples):
    xs, xh, zs, ys, cos, num, den = [], [], [], [], [], 0.0, 0.0
    for x, y in feature_cache.feature_batches(
      ctx.upstream,
      ctx.config,
      split_key,
      max_examples=max_examples,
      batch_size=bs,
      encoder=encoder,
      from_cache=ctx.config.fae.input == "cache",
    ):
      n = len(y)
      if n < bs:  # pad to a static shape: one compilation
        pad = np.zeros((bs - n, *x.shape[1:]), x.dtype)
        x_hat, mean = reconstruct(params, np.concatenate([x, pad]))
        x_hat, mean = np.asarray(x_hat)[:n], np.asarray(mean)[:n]
      else:
        x_hat, mean = (np.asarray(a) for a in reconstruct(params, x))
      cos.append(np.asarray(feature_metrics.cosine_similarity(x, x_hat)).mean(-1))
      num += float(((x_hat - x) ** 2).sum())
      den += float((x**2).sum())
      if probe:
        xs.append(np.asarray(linear_probe.pool_tokens(x)))
        xh.append(np.asarray(linear_probe.pool_tokens(x_hat)))
        zs.append(np.asarray(linear_probe.pool_tokens(mean)))
      ys.append(y)
    cat = lambda a: np.concatenate(a) if a else None  # noqa: E731
    return {
      "cos": float(np.concatenate(cos).mean()),
      "rel_mse": num / den,
      "x": cat(xs),
      "x_hat": cat(xh),
      "z": cat(zs),
      "y": cat(ys),
    }

  held = run("eval", cfg.max_examples)
  out = {"feature_cosine": held["cos"], "relative_mse": held["rel_mse"]}
  if probe:
    train = run("train", cfg.probe_train_examples)
    num_classes = int(max(train["y"].max(), held["y"].max()) + 1)
    for name in ("x", "x_hat", "z"):
      key = {"x": "probe_top1_x", "x_hat": "probe_top1_xhat", "z": "probe_top1_z"}[name]
      out[key] = float(
        linear_probe.linear_probe_top1(
          train[name],
          train["y"],
          held[name],
          held["y"],
          num_classes,
          l2=float(cfg.probe_l2),
          steps=int(cfg.probe_steps),
          seed=ctx.config.seed,
        )
      )
    out["probe_train_examples"] = int(len(train["y"]))
  out["eval_examples"] = int(len(held["y"]))
  return out


def run(ctx: StageContext) -> dict:
  config = ctx.config
  fcfg = config.fae
  if fcfg.input not in ("cache", "encoder"):
    raise ValueError(f"config.fae.input must be 'cache' or 'encoder', got {fcfg.input!r}.")
  encoder = _load_encoder(ctx, need_params=fcfg.input == "encoder")
  enc_params, spec, enc_meta = encoder
  mcfg = model_config(config, spec)
  dtype = jnp.dtype(fcfg.dtype)
  model = fae_model.Fae(mcfg, dtype=dtype)
  train_cfg = fcfg.train
  sharding.check_batch_divisible(int(train_cfg.batch_size), ctx.mesh, "config.fae.train")
  per_process = int(train_cfg.batch_size) // jax.process_count()
  beta = float(fcfg.beta)
  x0 = jnp.zeros((1, spec.num_tokens, spec.feature_dim), jnp.float32)

  def init_params(rng):
    return model.init({"params": rng}, x0, rng)["params"]

  def fae_loss_on(params, x, rng):
    out = model.apply({"params": params}, x, rng)
    return fae_losses.fae_loss(x, out["x_hat"], out["mean"], out["logvar"], beta=beta)

  if fcfg.input == "cache":
    source = _feature_source(ctx, "train", enc_meta)

    def data_iter_fn():
      ds = pipeline.make_cache_dataset(
        source, batch_size=per_process, seed=config.seed, data_config=config.data
      )
      return iter(ds.map(lambda b: {"features": b["features"]}))

    def loss_fn(params, batch, rng):
      return fae_loss_on(params, batch["features"].astype(jnp.float32), rng)

    extra = ()
  else:

    def data_iter_fn():
      return pipeline.make_train_image_iter(config, per_process)

    def loss_fn(params, batch, rng, frozen):
      x = encode_images(spec, frozen, images_to_model_range(batch["image"]), dtype=dtype)
      return fae_loss_on(params, jax.lax.stop_gradient(x), rng)

    extra = (enc_params,)

  def eval_fn(state):
    params = state.final_params()
    return evaluate(ctx, model, params, encoder, probe=False)

  t0 = time.time()
  state = loop.train(
    workdir=ctx.workdir,
    stage=NAME,
    config=train_cfg,
    mesh=ctx.mesh,
    init_params_fn=init_params,
    loss_fn=loss_fn,
    data_iter_fn=data_iter_fn,
    seed=config.seed,
    flops_per_example=fae_model.fae_flops_per_example(mcfg),
    eval_fn=eval_fn if int(train_cfg.eval_every) > 0 else None,
    extra_args=extra,
    saved_config=config,
  )
  train_seconds = time.time() - t0
  final = state.final_params()
  export_dir = artifacts.export_dir(ctx.workdir, NAME)
  # Collective save; one decision whether it is already there (a resumed run).
  if not multihost.decide_once("fae:export-exists", lambda: artifacts.export_exists(export_dir)):
    artifacts.save_export(
      export_dir,
      final,
      {
        "model": "fae",
        "config": mcfg.to_dict(),
        "weights": state.final_weights,
        "step": int(state.step),
        "encoder_fingerprint": enc_meta["fingerprint"],
      },
    )
  logging.info("fae: evaluating the final model (reconstruction and linear probes)")
  # The params are sharded over every host's devices: gather them (every host evaluates alike).
  results = evaluate(ctx, model, multihost.gather(final), encoder, probe=True)
  results.update(
    {
      "steps": int(state.step),
      "train_seconds": round(train_seconds, 1),
      "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(final))),
      "latent_shape": [*spec.grid, mcfg.latent_dim],
      "adapter_depth": mcfg.adapter_depth,
      "encoder_random": bool(enc_meta["source"].get("random")),
      "export": str(export_dir),
    }
  )
  results.update(train_metrics.logged_loss_curve(ctx.stage_dir(NAME)))
  if multihost.is_primary():
    write_json_atomic(ctx.stage_dir(NAME) / RESULTS, results)
  logging.info("fae results: %s", json.dumps(results, sort_keys=True))
  return results
