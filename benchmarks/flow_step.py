"""TarFlow train-step and sampling speed, and JAX MFU against this device's peak.

  python benchmarks/flow_step.py                      # small config on 8x8x8 latents (CPU, ~1 min)
  python benchmarks/flow_step.py --latent=16x16x32 --width=2048 --heads=32 --deep=18 \\
      --shallow-depth=2 --num-shallow=5 --batch=64 --dtype=bfloat16   # ImageNet model, on a GPU/TPU

Train step: the TarFlow objective (noise augmentation, label dropout, exact NLL) + AdamW on a
fixed batch, jitted with donation. Sampling: the jitted sampler (`flows.sampler.make_sample_fn`)
with the KV cache, with guidance (two streams in the deep block) and, with `--with-reference`,
without the cache (the recompute reference: T full passes per block, slow); all without the
denoising step. tokens/s counts generated latent tokens (each passes through every flow block).

MFU = model FLOPs / time / peak FLOP/s (`fae_jax.train.mfu.device_peak_flops`: a measured
float32 matmul on CPU, the vendor bf16 table on accelerators). Train FLOPs are 3x the analytic
forward (`tarflow.flow_flops_per_example`). For sampling the useful work is one forward pass
per sample, which is what the sampling MFU divides by; cached decoding is a chain of T
one-token steps per block, so it is latency-bound and its MFU is low by nature.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fae_jax.models import tarflow  # noqa: E402
from fae_jax.tarflow import objective, sampler  # noqa: E402
from fae_jax.train import mfu  # noqa: E402


def time_calls(fn, iters: int) -> tuple[float, float]:
  """`(first_call_s, median_s)`: the first call includes compilation."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def parse_latent(text: str) -> tuple[int, int]:
  h, w, ch = (int(v) for v in text.lower().split("x"))
  if h != w:
    raise ValueError(f"--latent needs a square grid (h == w), got {text}.")
  return h, ch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--latent", default="8x8x8", help="h x w x channels")
  parser.add_argument("--patch", type=int, default=1)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--deep", type=int, default=4, help="layers of the deep block")
  parser.add_argument("--shallow-depth", type=int, default=2)
  parser.add_argument("--num-shallow", type=int, default=3)
  parser.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"])
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32, help="train batch")
  parser.add_argument("--sample-batch", type=int, default=16)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  parser.add_argument(
    "--with-reference", action="store_true", help="also time the no-cache sampler (slow)"
  )
  args = parser.parse_args()

  device = jax.local_devices()[0]
  on_cpu = device.platform == "cpu"
  dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
  size, channels = parse_latent(args.latent)
  config = tarflow.TarFlowConfig(
    input_size=size,
    in_channels=channels,
    patch_size=args.patch,
    width=args.width,
    num_heads=args.heads,
    deep_depth=args.deep,
    shallow_depth=args.shallow_depth,
    num_shallow=args.num_shallow,
    ffn=args.ffn,
    num_classes=args.num_classes,
    dtype=dtype,
  )
  model = tarflow.TarFlow(config)
  rng = np.random.default_rng(0)
  b = args.batch
  x = jnp.asarray(rng.standard_normal((b, size, size, channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, config.num_classes, b), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), x[:1], y[:1])["params"]
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

  # --- train step ----------------------------------------------------------------------------
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)

  def step(params, opt_state, x, y, key):
    (_, metrics), grads = jax.value_and_grad(objective.flow_loss, has_aux=True)(
      params, model, x, y, key
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics["loss"]

  jit_step = jax.jit(step, donate_argnums=(0, 1))
  state = {"params": params, "opt": tx.init(params), "i": 0}

  def train_step():
    state["params"], state["opt"], loss = jit_step(
      state["params"], state["opt"], x, y, jax.random.key(state["i"])
    )
    state["i"] += 1
    return loss

  train_first, train_s = time_calls(train_step, args.iters)
  params = state["params"]
  peak, peak_source = mfu.device_peak_flops(device)
  fwd_flops = tarflow.flow_flops_per_example(config)
  train_flops = 3 * fwd_flops * b

  # --- sampling ------------------------------------------------------------------------------
  sb = args.sample_batch
  labels = jnp.asarray(rng.integers(0, config.num_classes, sb), jnp.int32)
  key = jax.random.key(1)
  samplers = {
    "cached": sampler.make_sample_fn(model, denoise_step=False),
    "cached_guided": sampler.make_sample_fn(model, guidance=2.0, denoise_step=False),
  }
  if args.with_reference:
    samplers["no_cache"] = sampler.make_sample_fn(model, cache=False, denoise_step=False)
  tokens = sb * config.num_tokens
  sample_results = {}
  for name, fn in samplers.items():
    first, median = time_calls(lambda fn=fn: fn(params, key, labels), args.iters)
    sample_results[name] = {
      "compile_and_first_s": round(first, 2),
      "s_per_batch": round(median, 4),
      "tokens_per_s": round(tokens / median, 1),
      "samples_per_s": round(sb / median, 2),
      "mfu_vs_one_forward": round(fwd_flops * sb / median / peak, 5),
    }

  result = {
    "config": config.to_dict(),
    "params": num_params,
    "device": device.device_kind,
    "num_devices_used": 1,
    "train": {
      "batch": b,
      "compile_and_first_s": round(train_first, 2),
      "step_s": round(train_s, 4),
      "examples_per_s": round(b / train_s, 2),
      "gflop_per_step": round(train_flops / 1e9, 2),
      "gflop_per_s": round(train_flops / train_s / 1e9, 2),
      "mfu": round(train_flops / train_s / peak, 4),
    },
    "sampling": {"batch": sb, "tokens_per_sample": config.num_tokens, **sample_results},
    "peak_gflop_per_s": round(peak / 1e9, 2),
    "peak_source": peak_source,
    "jax": jax.__version__,
  }
  print(
    f"TarFlow {num_params / 1e6:.2f}M params on {args.latent} latents ({config.num_tokens} "
    f"tokens), {dtype}, {device.device_kind}"
  )
  print(
    f"train: batch {b}, {train_s * 1e3:.1f} ms/step, {b / train_s:.1f} examples/s, "
    f"{train_flops / train_s / 1e9:.2f} GFLOP/s = MFU {train_flops / train_s / peak:.1%}"
  )
  for name, r in sample_results.items():
    print(
      f"sample[{name}]: batch {sb}, {r['s_per_batch'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} "
      f"tokens/s, {r['samples_per_s']:.1f} samples/s"
    )
  print(f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
