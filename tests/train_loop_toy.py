"""Toy problem for tests/test_train_loop.py, also run as a script in a fresh process.

A 2-layer MLP regresses a fixed linear map on a synthetic grain dataset; the loss adds input
noise drawn from the step key, so the RNG stream matters for the resume test.

Script: `python tests/train_loop_toy.py WORKDIR NUM_STEPS SIGTERM_AT OUT_NPZ` trains (or resumes)
the toy stage; SIGTERM_AT >= 0 sends SIGTERM to this process after that step; OUT_NPZ gets the
final params and EMA params.
"""

from __future__ import annotations

import os
import signal
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from fae_jax import sharding
from fae_jax.train import loop

STAGE = "toy"
IN_DIM, HIDDEN, OUT_DIM = 8, 32, 4
NUM_EXAMPLES = 64
BATCH = 16
TRACES = {"loss": 0}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, IN_DIM] -> [B, OUT_DIM]
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    return nn.Dense(OUT_DIM)(x)


def init_params(rng):
  return MLP().init(rng, jnp.zeros((1, IN_DIM)))


def loss_fn(params, batch, rng):
  TRACES["loss"] += 1  # Python side effect: runs once per trace
  x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
  pred = MLP().apply(params, x)
  per_example = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
  return per_example.mean(), {"mse_max": per_example.max(), "per_example": per_example}


def make_examples(nan_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  rs = np.random.RandomState(0)
  x = rs.normal(size=(NUM_EXAMPLES, IN_DIM)).astype(np.float32)
  y = (x @ rs.normal(size=(IN_DIM, OUT_DIM))).astype(np.float32)
  if nan_index is not None:
    x[nan_index] = np.nan
  return x, y


def make_data_iter_fn(shuffle: bool = True, nan_index: int | None = None):
  x, y = make_examples(nan_index)

  def data_iter_fn():
    ds = grain.MapDataset.range(NUM_EXAMPLES)
    if shuffle:
      ds = ds.shuffle(seed=3)
    ds = ds.repeat().map(lambda i: {"x": x[i], "y": y[i]}).batch(BATCH, drop_remainder=True)
    return iter(ds.to_iter_dataset())

  return data_iter_fn


def make_config(num_steps: int = 8):
  c = loop.default_train_config()
  c.num_steps = num_steps
  c.batch_size = BATCH
  c.lr = 3e-2
  c.warmup_steps = 2
  c.weight_decay = 1e-2
  c.ema_decay = 0.9
  c.fsdp_min_size = 64  # small enough that the kernels ([8, 32], [32, 4]) really shard
  c.log_every = 2
  c.checkpoint_every = 100
  return c


def make_mesh():
  return sharding.make_mesh(data=2, fsdp=4)


def main(argv):
  workdir, num_steps, sigterm_at, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
  config = make_config(num_steps)

  def eval_fn(state):
    if int(state.step) == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"step_seen": float(state.step)}

  config.eval_every = 1
  state = loop.train(
    workdir=workdir,
    stage=STAGE,
    config=config,
    mesh=make_mesh(),
    init_params_fn=init_params,
    loss_fn=loss_fn,
    data_iter_fn=make_data_iter_fn(),
    flops_per_example=2.0 * (IN_DIM * HIDDEN + HIDDEN * OUT_DIM),
    eval_fn=eval_fn,
  )
  flat = {
    "params/" + jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  }
  flat.update(
    {
      "ema/" + jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.ema_params))[0]
    }
  )
  np.savez(out, traces=TRACES["loss"], **flat)


if __name__ == "__main__":
  main(sys.argv)
