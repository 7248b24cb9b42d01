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
