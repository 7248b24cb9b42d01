"""Real-model train steps (FAE, DiT) on 8 fake devices with FSDP equal 1-device steps, and
compile once. The generic loop is tested on a toy in test_train_loop.py; these pin the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax import sharding
from fae_jax.flow_matching import objective
from fae_jax.losses import fae as fae_losses
from fae_jax.models import dit as dit_model
from fae_jax.models import fae as fae_model
from fae_jax.train import loop, optim


def _config():
  c = loop.default_train_config()
  c.lr, c.warmup_steps, c.num_steps, c.schedule = 1e-3, 0, 10, "constant"
  c.ema_decay = 0.9
  # Adam divides by sqrt(v) + eps: with the default 1e-8, parameters whose true gradient is 0
  # (the key bias: softmax is shift-invariant) get lr-sized updates from 1e-10 rounding noise,
  # which differs between shardings. A larger eps keeps the comparison about sharding (1e-6
  # still let the FAE's key bias drift by 1.3e-6 after the heads-first attention changed the
  # rounding: that gradient is pure noise, about 1e-9).
  c.eps = 1e-5
  c.fsdp_min_size = 64  # small enough that the tiny kernels really shard
  return c


def _steps(mesh, init_fn, loss_fn, batch, n=2):
  config = _config()
  tx, schedule = optim.make_optimizer(config)
  state, shardings = loop.create_train_state(
    config=config, mesh=mesh, init_params_fn=init_fn, tx=tx, seed=0
  )
  step = loop.make_train_step(
    loss_fn=loss_fn, tx=tx, schedule=schedule, config=config, shardings=shardings, mesh=mesh
  )
  losses = []
  for _ in range(n):
    state, metrics = step(state, sharding.global_batch(batch, mesh), ())
    losses.append(float(metrics["train/loss"]))
  return state, losses, step


def _compare(init_fn, loss_fn, batch):
  mesh8 = sharding.make_mesh(data=2, fsdp=4)
  mesh1 = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  s8, l8, step8 = _steps(mesh8, init_fn, loss_fn, batch)
  s1, l1, _ = _steps(mesh1, init_fn, loss_fn, batch)
  assert step8._cache_size() == 1
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(s8.params)), (
    "nothing was FSDP-sharded"
  )
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fae_step_sharded_equals_single_device():
  cfg = fae_model.FaeConfig(
    feature_dim=32, grid=(4, 4), latent_dim=4, adapter_heads=2, adapter_head_dim=16,
    decoder_depth=1, decoder_width=32, decoder_heads=2, decoder_head_dim=16,
  )  # fmt: skip
  model = fae_model.Fae(cfg)
  x = np.random.default_rng(0).standard_normal((16, 16, 32)).astype(np.float32)

  def init_fn(rng):
    return model.init({"params": rng}, jnp.zeros((1, 16, 32)), rng)["params"]

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["x"], rng)
    return fae_losses.fae_loss(batch["x"], out["x_hat"], out["mean"], out["logvar"], beta=1e-6)

  _compare(init_fn, loss_fn, {"x": x})


@pytest.mark.parametrize("patch", [1, 2])
def test_dit_step_sharded_equals_single_device(patch):
  cfg = dit_model.DitConfig.from_variant(
    f"S/{patch}", in_channels=4, input_size=4, width=32, depth=1, num_heads=2, num_classes=3
  )
  model = dit_model.Dit(cfg)
  rng = np.random.default_rng(1)
  batch = {
    "x": rng.standard_normal((16, 4, 4, 4)).astype(np.float32),
    "y": rng.integers(0, 3, 16).astype(np.int32),
  }

  def init_fn(key):
    z = jnp.zeros((1, 4, 4, 4))
    return model.init(key, z, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False)["params"]

  def loss_fn(params, b, key):
    k_drop, k_fm = jax.random.split(key)

    def velocity(xt, t, y):
      return model.apply({"params": params}, xt, t, y, train=True, rngs={"dropout": k_drop})

    return objective.flow_matching_loss(velocity, b["x"], b["y"], k_fm, cos_weight=1.0)

  _compare(init_fn, loss_fn, batch)
