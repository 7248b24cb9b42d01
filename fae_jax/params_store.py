"""Inference parameters on disk: an Orbax params checkpoint plus a JSON description.

Layout of a directory written by `save_params`:

  params/     Orbax checkpoint of the params pytree (float32)
  <meta>.json what the params are (model kind, its config, provenance), for humans and loaders

Multi-host: `save_params` is collective (every process calls it, like the Orbax save inside it;
Orbax writes from the primary host). GCS-safe: nothing is renamed; the `<meta>.json` file is the
commit marker (`multihost.committed_directory`), written by process 0 after every process has
finished the params, so `exists` (the marker) never sees a half-written model, and a directory
left without it by a crash is removed and written again. Used for the converted encoder (`encoder/encoder.json`) and for the
exported EMA weights of every trained stage (`<stage>/export/model.json`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fae_jax import multihost, storage_errors

PARAMS_NAME = "params"


def exists(directory: str | os.PathLike, meta_name: str) -> bool:
  """True when the directory is complete (its `meta_name` commit marker exists); per process."""
  return multihost.is_committed(directory, meta_name)


def save_params(
  directory: str | os.PathLike, params: Any, meta: dict[str, Any], meta_name: str
) -> dict[str, Any]:
  """Writes `params` (as float32) and `meta`; collective: every process calls it.

  `params` may hold global arrays sharded over several hosts (each host writes nothing itself;
  Orbax assembles the shards) or host numpy arrays (equal on every host). Raises
  `FileExistsError` on every process when the directory is already complete.
  """
  params = jax.tree.map(
    lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else np.asarray(a, np.float32),
    params,
  )
  meta = dict(meta)
  meta["num_params"] = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
  text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
  kept = f"Nothing in {directory} counts until {meta_name} is written; the rerun writes it again."
  with storage_errors.writing(f"saving {meta_name}'s parameters", directory, kept=kept):
    with multihost.committed_directory(directory, meta_name, text) as tmp:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp / PARAMS_NAME).resolve(), params)
        ckptr.wait_until_finished()
  return meta


def load_meta(directory: str | os.PathLike, meta_name: str, missing_hint: str) -> dict[str, Any]:
  path = epath.Path(directory) / meta_name
  if not exists(directory, meta_name):
    raise FileNotFoundError(f"Nothing saved at {directory} ({meta_name} missing). {missing_hint}")
  return json.loads(path.read_text())


def load_params(directory: str | os.PathLike, shardings: Any | None = None) -> Any:
  """Restores the params; onto `shardings` (a matching pytree) when given, else as host numpy
  arrays (every process reads them whole; with several processes Orbax's default would be arrays
  spanning every host's devices, which no host can read, and a committed single-device array
  cannot be `device_put` onto a mesh of several hosts, while numpy can).
  """
  path = (epath.Path(directory) / PARAMS_NAME).resolve()
  with ocp.StandardCheckpointer() as ckptr:
    abstract = ckptr.metadata(path).item_metadata
    if hasattr(abstract, "tree"):
      abstract = abstract.tree
    if shardings is None:
      local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), abstract
      )
    else:
      target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), abstract, shardings
      )
    restored = ckptr.restore(path, target)
  return restored if shardings is not None else jax.device_get(restored)
