"""`remat` of the FAE's feature decoder and the pixel decoder: same parameters, same numbers;
and the config fields that expose it and the data-reading knobs to the command line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, imagenet
from fae_jax.models import fae, pixel_decoder

FAE = fae.FaeConfig(
  feature_dim=16,
  grid=(2, 2),
  latent_dim=4,
  adapter_heads=2,
  adapter_head_dim=8,
  decoder_depth=2,
  decoder_width=16,
  decoder_heads=2,
  decoder_head_dim=8,
)
PIXEL = pixel_decoder.PixelDecoderConfig(
  feature_dim=16, grid=(2, 2), width=16, depth=2, num_heads=2, patch_size=2
)


def _fae_loss(config):
  model = fae.Fae(config)
  x = jax.random.normal(jax.random.key(0), (2, config.num_tokens, config.feature_dim))
  params = model.init({"params": jax.random.key(1)}, x, jax.random.key(2))["params"]

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x, jax.random.key(2))["x_hat"] - x) ** 2)

  return params, loss


def _pixel_loss(config):
  model = pixel_decoder.PixelDecoder(config)
  x = jax.random.normal(jax.random.key(0), (2, 4, config.feature_dim))
  params = model.init(jax.random.key(1), x)["params"]
  return params, lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)


@pytest.mark.parametrize("make, config", [(_fae_loss, FAE), (_pixel_loss, PIXEL)])
def test_remat_same_params_and_gradients(make, config):
  params, loss = make(config)
  params_r, loss_r = make(dataclasses.replace(config, remat=True))
  assert jax.tree.structure(params) == jax.tree.structure(params_r)
  value, grads = jax.value_and_grad(loss)(params)
  value_r, grads_r = jax.value_and_grad(loss_r)(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)
  # The rematerialised backward really recomputes: a checkpoint appears in the jaxpr.
  assert "remat" in str(jax.make_jaxpr(jax.grad(loss_r))(params))


def test_memory_and_data_knobs_are_config_fields():
  config = common.base_config()
  for key in (
    "fae.model.remat",
    "pixel.model.remat",
    "diffusion.model.remat",
    "flow.model.remat",
    "fae.train.grad_accum_steps",
    "diffusion.train.profile_steps",
    "data.num_workers",
    "data.read_threads",
    "data.prefetch_buffer_size",
  ):
    node = config
    for part in key.split("."):
      node = node[part]  # KeyError names a missing field
  paper = imagenet.get_config()
  assert paper.diffusion.dtype == paper.fae.dtype == paper.pixel.dtype == "bfloat16"
  assert paper.flow.dtype == paper.encoder.dtype == "bfloat16"
