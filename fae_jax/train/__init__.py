"""The train loop shared by every training stage, and its parts.

`loop.train` runs a stage; `optim` builds AdamW and its schedule; `state` holds `TrainState`
and the EMA; `checkpoint` wraps Orbax (state + grain iterator + config); `metrics` writes and
reads `train_log.jsonl`; `mfu` knows peak FLOP/s; `latent_generator` trains a generator on the
latent cache (the `diffusion` and `flow` stages).
"""

from fae_jax.train.checkpoint import Checkpointer
from fae_jax.train.loop import (
  Preempted,
  abstract_train_state,
  create_train_state,
  default_train_config,
  make_train_step,
  train,
)
from fae_jax.train.mfu import device_peak_flops
from fae_jax.train.optim import make_optimizer, make_schedule, weight_decay_mask
from fae_jax.train.state import TrainState

__all__ = [
  "Checkpointer",
  "Preempted",
  "TrainState",
  "abstract_train_state",
  "create_train_state",
  "default_train_config",
  "device_peak_flops",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "train",
  "weight_decay_mask",
]
