"""Test setup: 8 fake CPU devices so sharding is exercised without accelerators.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags; tests never parse argv.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True, scope="session")
def _check_devices():
  assert jax.device_count() == 8, jax.devices()


# ------------------------------------------------------------------------------------------------
# Shared fixtures of the stage end-to-end tests: a small random encoder and tiny pipeline configs.
# ------------------------------------------------------------------------------------------------

from configs import demo  # noqa: E402
from fae_jax.models.dinov2 import Dinov2Config  # noqa: E402

# A 1-layer DINOv2 of width 32 (2x2 tokens at 28 px): what `encoder.variant` resolves to in tests.
SMALL_ENCODER = Dinov2Config(width=32, depth=1, num_heads=2, pos_grid=4, interpolate_offset=0.0)


def use_small_encoder(monkeypatch) -> None:
  """Makes every `Dinov2Config.from_variant` (the `convert` stage's lookup) the small encoder."""
  monkeypatch.setattr(Dinov2Config, "from_variant", classmethod(lambda cls, *a, **k: SMALL_ENCODER))


@pytest.fixture
def small_encoder(monkeypatch):
  use_small_encoder(monkeypatch)


@pytest.fixture(scope="session")
def patch_small_encoder():
  """`use_small_encoder`, for module- or session-scoped fixtures with their own MonkeyPatch."""
  return use_small_encoder


def make_tiny_pipeline_config(num_examples=64, max_train_examples=48, examples_per_shard=32):
  """The demo's random-encoder tiny preset on synthetic 28 px images: a random encoder at 28 px
  (2 x 2 tokens of width 32 with `small_encoder`) and a tiny FAE; tests set the rest."""
  config = demo.get_config("random_encoder,tiny")
  config.data.name = "synthetic"
  config.data.num_examples = num_examples
  config.data.synthetic_image_size = 28
  config.data.max_train_examples = max_train_examples
  config.data.max_eval_examples = 16
  config.encoder.image_size = 28  # 2 x 2 tokens
  config.encode.examples_per_shard = examples_per_shard
  config.encode.batch_size = 16
  m = config.fae.model
  m.latent_dim = 4
  m.adapter_heads, m.adapter_head_dim = 2, 16
  m.decoder_depth, m.decoder_width, m.decoder_heads, m.decoder_head_dim = 1, 32, 2, 16
  return config


@pytest.fixture(scope="session")
def tiny_pipeline_config():
  """`make_tiny_pipeline_config` (a factory: every call returns a fresh config)."""
  return make_tiny_pipeline_config


def make_tiny_generation_config():
  """Through `evaluate` with the diffusion generator; 4 classes."""
  config = make_tiny_pipeline_config(num_examples=48, max_train_examples=32, examples_per_shard=16)
  config.stages = ("convert", "encode", "fae", "pixel", "latents", "diffusion", "evaluate")
  config.data.num_classes = 4
  config.latents.flip = True  # exercise the image path with flips (the demo turns flips off)
  config.fae.train.num_steps, config.fae.train.batch_size = 3, 8
  config.fae.eval.batch_size, config.fae.eval.probe_steps = 8, 10
  config.pixel.model.patch_size = 14  # 2 x 2 tokens x 14 px = 28 px
  dm = config.diffusion.model
  config.diffusion.objective.timestep_shift = 0.4  # the paper's value: s = 2.5
  dm.variant = "S/1"
  dm.width, dm.depth, dm.num_heads = 32, 1, 2
  t = config.diffusion.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 4, 8, 2, 2
  t.ema_decay = 0.9
  e = config.evaluate
  e.generators = ("diffusion",)  # the demo also evaluates the flow (tests/test_flow_stage.py)
  e.num_samples, e.batch_size, e.probe_train_examples, e.probe_steps = 8, 8, 16, 10
  e.grid_per_class = 2
  e.samples_per_shard = 4  # two shards per pass
  e.unguided.num_steps = e.guided.num_steps = 3
  return config


@pytest.fixture(scope="session")
def tiny_generation_config():
  """`make_tiny_generation_config` (a factory: every call returns a fresh config)."""
  return make_tiny_generation_config
