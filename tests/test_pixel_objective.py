"""The pixel decoder's phase objective: the 'dino' perceptual term on a subset and per phase."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from fae_jax.losses import pixel as pixel_terms
from fae_jax.losses import pixel_decoder as objective
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.dinov2 import Dinov2Config
from fae_jax.models.encoder import EncoderSpec, FrozenEncoder, encode_images
from fae_jax.stages import pixel as pixel_stage

_ENCODER = Dinov2Config(width=32, depth=1, num_heads=2, pos_grid=4, interpolate_offset=0.0)
_SPEC = EncoderSpec(_ENCODER, image_size=28)
_DECODER = pd.PixelDecoderConfig(
  feature_dim=32, grid=(2, 2), width=16, depth=1, num_heads=2, patch_size=14
)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, size=(8, 28, 28, 3)), jnp.uint8)
  encoder_params = FrozenEncoder(_SPEC).init(
    jax.random.key(0), jnp.zeros((1, 28, 28, 3), jnp.float32)
  )["params"]["backbone"]
  decoder = pd.PixelDecoder(_DECODER)
  features = jnp.asarray(rng.normal(size=(8, 4, 32)), jnp.float32)
  decoder_params = decoder.init(jax.random.key(1), features)["params"]
  models = objective.PixelModels(
    spec=_SPEC, decoder=decoder, disc=None, fae=None, encoder_dtype=jnp.float32
  )
  return images, features, encoder_params, decoder_params, models


def _pixel_config(**loss):
  p = common.base_config().pixel
  p.noise.mode = "none"  # the decoder's input is then exactly the features
  p.loss.gan_weight = 0.0
  p.loss.perceptual = "dino"
  p.loss.perc_weight = 0.5
  for key, value in loss.items():
    p.loss[key] = value
  return p


def _loss(p, setup, phase="noisy", step=0):
  images, features, encoder_params, decoder_params, models = setup
  loss_fn = objective.make_loss_fn(p, phase, models)
  batch = {"image": images, "features": features}
  return loss_fn(
    {"decoder": decoder_params}, batch, jax.random.key(2), {"encoder": encoder_params}, step=step
  )


@pytest.mark.parametrize("perc_examples, stride", [(0, 1), (2, 4), (8, 1)])
def test_dino_term_on_every_stride_th_example_against_the_clean_features(
  setup, perc_examples, stride
):
  images, features, encoder_params, decoder_params, models = setup
  loss, metrics = _loss(_pixel_config(perc_examples=perc_examples), setup)
  recon = models.decoder.apply({"params": decoder_params}, features)
  target = images.astype(jnp.float32) / 127.5 - 1.0
  rec = np.mean(np.abs(np.asarray(recon) - np.asarray(target)))
  recon_feats = encode_images(_SPEC, encoder_params, recon[::stride])
  perc = np.mean(np.square(np.asarray(recon_feats) - np.asarray(features[::stride])))
  np.testing.assert_allclose(metrics["perceptual"], perc, rtol=1e-5)
  np.testing.assert_allclose(loss, rec + 0.5 * perc, rtol=1e-5)


def test_perceptual_only_in_the_listed_phases(setup):
  p = _pixel_config(perc_phases=("finetune",))
  loss, metrics = _loss(p, setup, "noisy")
  assert "perceptual" not in metrics and loss == metrics["rec"]
  assert objective.perceptual_active(p.loss, "finetune")
  assert not objective.perceptual_active(p.loss, "noisy")


def test_perceptual_every_k_th_step_only_and_zero_with_no_gradient_between(setup):
  images, features, encoder_params, decoder_params, models = setup
  batch = {"image": images, "features": features}

  def loss_and_grad(p):
    loss_fn = objective.make_loss_fn(p, "noisy", models)

    @jax.jit
    def f(params, step):
      return jax.value_and_grad(
        lambda q: loss_fn(
          {"decoder": q}, batch, jax.random.key(2), {"encoder": encoder_params}, step=step
        ),
        has_aux=True,
      )(params)

    return f

  every3 = loss_and_grad(_pixel_config(perc_examples=2, perc_every=3))
  always = loss_and_grad(_pixel_config(perc_examples=2))
  never = loss_and_grad(_pixel_config(perc_examples=2, perc_weight=0.0))
  for step in range(7):
    (loss, metrics), grads = every3(decoder_params, jnp.int32(step))
    (ref, ref_metrics), ref_grads = (always if step % 3 == 0 else never)(
      decoder_params, jnp.int32(step)
    )
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["perceptual"], ref_metrics.get("perceptual", 0.0))
    if step % 3 == 0:
      assert metrics["perceptual"] > 0
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )


def test_dino_feature_loss_to_matches_encoding_the_targets():
  proj = jnp.asarray(np.random.default_rng(5).normal(size=(4 * 4 * 3, 6)), jnp.float32)

  def encode(images):
    return images.reshape(images.shape[0], 16, 48) @ proj

  rng = np.random.default_rng(1)
  target, recon = (jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32) for _ in range(2))
  np.testing.assert_allclose(
    pixel_terms.dino_feature_loss_to(encode, encode(target), recon),
    pixel_terms.dino_feature_loss(encode, target, recon),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="targets' features"):
    pixel_terms.dino_feature_loss_to(encode, encode(target)[:, :8], recon)


def test_bad_perceptual_settings_name_the_fix():
  with pytest.raises(ValueError, match="must divide the batch size 32"):
    objective.perceptual_subset(32, 5)
  assert objective.perceptual_subset(32, 8) == 4 and objective.perceptual_subset(32, 0) == 1
  config = ml_collections.ConfigDict({"pixel": common.base_config().pixel})
  p = config.pixel
  p.loss.perc_examples = 3
  with pytest.raises(ValueError, match="perc_examples=3 must divide"):
    pixel_stage.check_config(config)
  p.loss.perc_examples = 0
  for bad in (0, -2):
    p.loss.perc_every = bad
    with pytest.raises(ValueError, match="perc_every must be an integer >= 1"):
      pixel_stage.check_config(config)
  p.loss.perc_every = 4
  pixel_stage.check_config(config)
  p.loss.perc_phases = ("noisy", "fine")
  with pytest.raises(ValueError, match="perc_phases has \\['fine'\\]"):
    pixel_stage.check_config(config)
