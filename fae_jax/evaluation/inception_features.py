"""Runs the FID Inception over uint8 image batches, data-parallel over this host's devices.

`inception_feature_fn(params, batch_size)` returns a function for `adm_npz.batch_activations`:
uint8 `[B, H, W, 3]` (B <= batch_size) -> `{'pool3': [B, 2048], 'spatial': [B, 2023],
'logits_unbiased': [B, 1008]}` float32 numpy. Every call is padded to the same batch size, so
one input resolution compiles once. The params are passed to the jitted function as a
replicated argument (never captured as constants); the batch is split over the local devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fae_jax import sharding
from fae_jax.models.inception import FIDInceptionV3

OUTPUTS = ("pool3", "spatial", "logits_unbiased")


def inception_feature_fn(
  params: Any, batch_size: int, devices: list[jax.Device] | None = None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """Returns the batched feature function (see the module docstring).

  Args:
    params: `FIDInceptionV3` params (`fae_jax.convert.inception.load_inception`).
    batch_size: images per call; rounded up to a multiple of the device count.
    devices: devices to split the batch over (default: this process's local devices).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = sharding.make_mesh(data=len(devices), fsdp=1, devices=devices)
  padded = -(-max(batch_size, 1) // len(devices)) * len(devices)
  model = FIDInceptionV3()

  def apply(p, images):
    out = model.apply({"params": p}, images)
    return {k: out[k] for k in OUTPUTS}

  run = jax.jit(
    apply,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
  params = jax.device_put(params, sharding.replicated(mesh))

  def features(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    n = images.shape[0]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
        f"Inception features need uint8 [B, H, W, 3], got {images.dtype} {images.shape}."
      )
    if n > padded:
      raise ValueError(f"Inception features: batch of {n} exceeds batch_size {padded}.")
    batch = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.uint8)])
    out = jax.device_get(run(params, batch))
    return {k: np.asarray(v[:n], np.float32) for k, v in out.items()}

  return features
