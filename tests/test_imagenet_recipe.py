"""The ImageNet config builds the paper's models: parameter counts within 1% of PAPER.md.

Counts come from `jax.eval_shape` on the models the stages build from `configs/imagenet.py`
(nothing is allocated), so a config drift that changes a model's size fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet
from fae_jax.models import dinov2
from fae_jax.models import dit as dit_model
from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.encoder import EncoderSpec
from fae_jax.stages import diffusion as diffusion_stage
from fae_jax.stages import fae as fae_stage
from fae_jax.stages import pixel as pixel_stage

PAPER = {"adapter": 38.17e6, "feature_decoder": 170.43e6, "pixel_decoder": 305.36e6, "dit": 675e6}


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def config_and_spec():
  config = imagenet.get_config()
  backbone = dinov2.Dinov2Config.from_variant(config.encoder.variant)
  spec = EncoderSpec(backbone, config.encoder.image_size, config.encoder.features)
  assert spec.grid == (16, 16) and spec.feature_dim == 1536
  return config, spec


def _within_one_percent(name: str, count: int) -> None:
  print(f"{name}: {count:,} (paper {PAPER[name]:,.0f}, {count / PAPER[name] - 1:+.2%})")
  assert abs(count / PAPER[name] - 1) < 0.01, (name, count, PAPER[name])


def test_fae_counts_match_paper(config_and_spec):
  config, spec = config_and_spec
  model = fae_model.Fae(fae_stage.model_config(config, spec))
  x = jax.ShapeDtypeStruct((1, spec.num_tokens, spec.feature_dim), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, sample_posterior=False), x)
  _within_one_percent("adapter", _count(params["params"]["encoder"]))
  _within_one_percent("feature_decoder", _count(params["params"]["decoder"]))


def test_pixel_decoder_count_matches_paper(config_and_spec):
  config, spec = config_and_spec
  model = pd.PixelDecoder(pixel_stage.decoder_config(config, spec))
  x = jax.ShapeDtypeStruct((1, spec.num_tokens, spec.feature_dim), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  _within_one_percent("pixel_decoder", _count(params["params"]))


def test_lightning_dit_count_matches_paper(config_and_spec):
  config, _ = config_and_spec
  latent = (16, 16, config.fae.model.latent_dim)
  model = dit_model.Dit(diffusion_stage.model_config(config, latent, num_classes=1000))
  x = jax.ShapeDtypeStruct((1, *latent), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(
    lambda x, t, y: model.init(jax.random.key(0), x, t, y, train=False), x, t, y
  )
  _within_one_percent("dit", _count(params["params"]))
