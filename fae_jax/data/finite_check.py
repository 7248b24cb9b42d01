"""NaN/Inf outputs refused when a cache is written (`encode` features, `latents` posteriors).

A non-finite feature in the cache would surface much later as a NaN loss in `fae` (the train
loop's `FloatingPointError`), far from its cause. `write_image_cache` instead asks `bad_ids` for
every batch it computes and, at the end of each shard, `refuse` raises `NonFiniteOutputsError`
naming the examples (ids), the fields, the count and the fix, before the shard is committed: the
shard's temporary file is discarded, the complete shards stay, and a rerun after the fix resumes.
The check is one vectorised pass over the host copy of each batch (a few per cent of a CPU
encode at most, nothing next to the encoder's FLOPs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

_SHOWN = 20  # ids listed in the message


class NonFiniteOutputsError(FloatingPointError):
  """Computed cache fields hold NaN or Inf; the message names the example ids and the fix."""


def bad_ids(outputs: Mapping[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, set[str]]:
  """`(ids of the examples with a non-finite value in a floating field, those fields)`."""
  bad = np.zeros(len(ids), bool)
  fields = set()
  for name, value in outputs.items():
    value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating) or value.size == 0:
      continue
    rows = ~np.isfinite(value).reshape(len(ids), -1).all(axis=1)
    if rows.any():
      fields.add(name)
      bad |= rows
  return np.asarray(ids)[bad], fields


def _hint(what: str, config: ml_collections.ConfigDict) -> str:
  if what == "encode":
    source = config.encoder.source or "''"
    return (
      f"check the encoder's weights (config.encoder.source={source}: a damaged or wrongly "
      f"converted file?) and config.encoder.dtype={config.encoder.dtype!r} (bfloat16 can "
      "overflow: try float32), and the images with these ids"
    )
  return (
    f"check the model that computed them ({what}: the `fae` export and config.fae.dtype="
    f"{config.fae.dtype!r}) and the images with these ids"
  )


def refuse(
  what: str,
  split_key: str,
  shard: int,
  ids: Sequence[np.ndarray],
  fields: set[str],
  config: ml_collections.ConfigDict,
) -> None:
  """Raises `NonFiniteOutputsError` when `ids` (bad ids of the shard's batches) is not empty."""
  ids = np.concatenate(ids) if len(ids) else np.zeros(0, np.int64)
  if not len(ids):
    return
  shown = ", ".join(str(int(i)) for i in ids[:_SHOWN]) + (", ..." if len(ids) > _SHOWN else "")
  raise NonFiniteOutputsError(
    f"{what} {split_key}: {len(ids)} example(s) of shard {shard} got NaN/Inf in "
    f"{sorted(fields)} (example ids {shown}); refused, as a cache holding them would make a NaN "
    f"loss later. This shard was not written; the complete shards are kept. Fix: "
    f"{_hint(what, config)}; then rerun the same command: it resumes at this shard."
  )
