"""Inference parameters on disk: an Orbax params checkpoint plus a JSON description.

Layout of a directory written by `save_params`:

  params/     Orbax checkpoint of the params pytree (float32)
  <meta>.json what the params are (model kind, its config, provenance), for humans and loaders

The directory is assembled under a temporary name and renamed when complete, so a crash never
leaves a half-written model. Used for the converted encoder (`encoder/encoder.json`) and for the
exported EMA weights of every trained stage (`<stage>/export/model.json`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fae_jax import fileio

PARAMS_NAME = "params"


def exists(directory: str | os.PathLike, meta_name: str) -> bool:
  return (epath.Path(directory) / meta_name).exists()


def save_params(
  directory: str | os.PathLike, params: Any, meta: dict[str, Any], meta_name: str
) -> dict[str, Any]:
  """Writes `params` (gathered to host, float32) and `meta` atomically; returns `meta`."""
  directory = epath.Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} already exists; delete it to write it again.")
  tmp = fileio.temp_path(directory)
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  params = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
  meta = dict(meta)
  meta["num_params"] = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp / PARAMS_NAME).resolve(), params)
    ckptr.wait_until_finished()
  (tmp / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  tmp.rename(directory)
  return meta


def load_meta(directory: str | os.PathLike, meta_name: str, missing_hint: str) -> dict[str, Any]:
  path = epath.Path(directory) / meta_name
  if not path.exists():
    raise FileNotFoundError(f"Nothing saved at {directory} ({meta_name} missing). {missing_hint}")
  return json.loads(path.read_text())


def load_params(directory: str | os.PathLike, shardings: Any | None = None) -> Any:
  """Restores the params; onto `shardings` (a matching pytree) when given, else host arrays."""
  path = (epath.Path(directory) / PARAMS_NAME).resolve()
  with ocp.StandardCheckpointer() as ckptr:
    abstract = ckptr.metadata(path).item_metadata
    if hasattr(abstract, "tree"):
      abstract = abstract.tree
    if shardings is None:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), abstract)
    else:
      target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), abstract, shardings
      )
    return ckptr.restore(path, target)
