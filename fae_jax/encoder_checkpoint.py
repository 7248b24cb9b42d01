"""The converted frozen encoder on disk: Orbax params + JSON model config + source hash.

Layout of `<workdir>/encoder/` (written once by the `convert` stage or
`python -m fae_jax.convert dinov2`):

  params/         Orbax checkpoint of the Flax params pytree (float32)
  encoder.json    {"model": "dinov2", "config": Dinov2Config fields, "source": {path, sha256,
                   format, random}, "fingerprint": sha256 of config + source hash}

The directory is assembled under a temporary name and renamed when complete, so a crash never
leaves a half-written encoder. Loading needs neither torch nor the source file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fae_jax.models.dinov2 import Dinov2Config

META_NAME = "encoder.json"
PARAMS_NAME = "params"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def fingerprint(config: Dinov2Config, source_sha256: str) -> str:
  """Identifies the encoder's weights and architecture; caches record it to detect staleness."""
  blob = json.dumps({"config": config.to_dict(), "source": source_sha256}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def is_saved(directory: str | os.PathLike) -> bool:
  return (epath.Path(directory) / META_NAME).exists()


def save_encoder(
  directory: str | os.PathLike, params: Any, config: Dinov2Config, source: dict[str, Any]
) -> dict[str, Any]:
  """Writes params + metadata atomically; returns the metadata."""
  directory = epath.Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} already exists; delete it to convert again.")
  tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp / PARAMS_NAME).resolve(), params)
    ckptr.wait_until_finished()
  meta = {
    "model": "dinov2",
    "config": config.to_dict(),
    "source": dict(source),
    "fingerprint": fingerprint(config, source.get("sha256", "")),
    "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
  }
  (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  tmp.rename(directory)
  return meta


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  path = epath.Path(directory) / META_NAME
  if not path.exists():
    raise FileNotFoundError(
      f"No converted encoder at {directory} ({META_NAME} missing). Run the `convert` stage "
      "(python -m fae_jax.main --config=... with 'convert' in config.stages) or "
      "`python -m fae_jax.convert dinov2 --src=CHECKPOINT --out=DIR`."
    )
  return json.loads(path.read_text())


def load_encoder(
  directory: str | os.PathLike, shardings: Any | None = None
) -> tuple[Any, Dinov2Config, dict[str, Any]]:
  """Returns `(params, config, metadata)`; params restored onto `shardings` when given."""
  meta = load_metadata(directory)
  config = Dinov2Config.from_dict(meta["config"])
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
    params = ckptr.restore(path, target)
  return params, config, meta
