"""Stage `encode`: the frozen encoder over dataset splits -> `<workdir>/features/<split>/`.

The cache format, its metadata checks and the resumable multi-host writer are
`fae_jax.data.feature_cache`; this stage runs the writer over `config.encode.splits` with the
converted encoder and reports counts and throughput. Complete when every split's cache is.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from fae_jax import artifacts
from fae_jax.data import array_cache, feature_cache
from fae_jax.stages.context import StageContext

NAME = "encode"


def is_complete(ctx: StageContext) -> bool:
  return all(
    array_cache.is_complete(feature_cache.cache_dir(ctx.upstream, key))
    for key in ctx.config.encode.splits
  )


def run(ctx: StageContext) -> dict:
  params, spec, meta = artifacts.load_frozen_encoder(ctx.encoder_dir, ctx.config)
  t0 = time.time()
  results = {}
  for key in ctx.config.encode.splits:
    results[key] = feature_cache.encode_split(
      ctx.config, ctx.upstream, key, params=params, spec=spec, encoder_meta=meta
    )
  encoded = sum(r["encoded"] for r in results.values())
  rates = [r["rate"] for r in results.values() if r["encoded"]]
  report = {
    "num_examples": int(sum(r["num_examples"] for r in results.values())),
    "num_examples_per_split": {k: int(r["num_examples"]) for k, r in results.items()},
    # Steady-state rate (compilation excluded), weighted by the examples of each split.
    "images_per_second": float(
      sum(r["rate"] * r["encoded"] for r in results.values()) / encoded if rates else 0.0
    ),
    "invalid_images": int(sum(r["invalid"] for r in results.values())),
    "seconds_total": round(time.time() - t0, 2),
    "token_shape": [spec.num_tokens, spec.feature_dim],
    "dir": str(ctx.features_dir),
  }
  logging.info(
    "encode: %d examples, %.1f images/s (steady state, %d process(es))",
    report["num_examples"],
    report["images_per_second"],
    jax.process_count(),
  )
  return report
