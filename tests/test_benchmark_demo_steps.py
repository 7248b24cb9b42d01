"""`benchmarks/demo_steps.py` measures each step's shape ceiling on the step's own matmul shape.

The ceiling is the rate of `[batch x tokens, width] @ [width, width]`; tokens per example are the
encoder's patch grid (8 x 8 in the demo), which the FAE, the pixel decoder and the generators'
latents all keep. An earlier version counted the pixel decoder's tokens as `(112 / 4)^2 = 784`
(the encoder's input size over the decoder's output patch), timing a 12x taller matmul.
"""

from __future__ import annotations

import importlib.util
import os

from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  path = os.path.join(ROOT, "benchmarks", "demo_steps.py")
  spec = importlib.util.spec_from_file_location("demo_steps_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_shape_ceiling_uses_the_token_grid_of_each_step():
  bench = _bench()
  config = demo.get_config()
  tokens = bench._tokens_per_example(config)
  assert tokens == (config.encoder.image_size // 14) ** 2 == 64
  widths = {
    "fae": (config.fae.train.batch_size, config.fae.model.decoder_width),
    "pixel": (config.pixel.noisy.train.batch_size, config.pixel.model.width),
    "pixel_finetune": (config.pixel.finetune.train.batch_size, config.pixel.model.width),
    "diffusion": (config.diffusion.train.batch_size, config.diffusion.model.width),
    "flow": (config.flow.train.batch_size, config.flow.model.width),
  }
  for name, (batch, width) in widths.items():
    (m, k, n), what = bench._shape_ceiling(name, config, tokens)
    assert (m, k, n) == (batch * tokens, width, width), name
    assert f"[{batch * tokens}x{width}]" in what


def test_hlo_dots_counts_every_matmul_of_a_compiled_gradient():
  """`hlo_dots` (the step breakdown's parser) finds each dot of an optimized HLO module with its
  shapes, and their FLOPs add up to the hand count."""
  import jax
  import jax.numpy as jnp

  bench = _bench()

  def f(x, w, q, k):
    return jnp.tanh(x @ w).sum() + jnp.einsum("bhqd,bhkd->bhqk", q, k).sum()

  args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((2, 3, 5, 8)), jnp.ones((2, 3, 7, 8)))
  hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()
  dots = bench.hlo_dots(hlo)
  # x @ w (kept for tanh'), g @ w^T, x^T @ g, and dq = g @ k (the einsum's own value is unused).
  expected = 3 * 2 * 64 * 32 * 16 + 2 * (2 * 3 * 5 * 7) * 8
  assert sum(d["flops"] for d in dots) == expected, dots
  assert len(dots) == 4
  batched = [d for d in dots if d["dims"]["lhs_batch"]]
  assert len(batched) == 1 and batched[0]["dims"]["lhs_batch"] == (0, 1)
  assert all(d["dtypes"] == ("f32", "f32", "f32") for d in dots)
  seconds = bench._dot_seconds(batched[0], iters=2)
  assert 0 < seconds < 1
