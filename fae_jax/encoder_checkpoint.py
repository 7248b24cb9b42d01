"""The converted frozen encoder on disk: Orbax params + JSON model config + source hash.

Layout of `<workdir>/encoder/` (written once by the `convert` stage or
`python -m fae_jax.convert dinov2`), via `fae_jax.params_store`:

  params/         Orbax checkpoint of the Flax params pytree (float32)
  encoder.json    {"model": "dinov2", "config": Dinov2Config fields, "source": {path, sha256,
                   format, random}, "fingerprint": sha256 of config + source hash}

Loading needs neither torch nor the source file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from etils import epath

from fae_jax import params_store
from fae_jax.models.dinov2 import Dinov2Config

META_NAME = "encoder.json"
_MISSING = (
  "Run the `convert` stage (python -m fae_jax.main --config=... with 'convert' in "
  "config.stages) or `python -m fae_jax.convert dinov2 --src=CHECKPOINT --out=DIR`."
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  # epath, not the built-in open: the source may be a gs:// URL.
  with epath.Path(path).open("rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def fingerprint(config: Dinov2Config, source_sha256: str) -> str:
  """Identifies the encoder's weights and architecture; caches record it to detect staleness."""
  blob = json.dumps({"config": config.to_dict(), "source": source_sha256}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def is_saved(directory: str | os.PathLike) -> bool:
  return params_store.exists(directory, META_NAME)


def save_encoder(
  directory: str | os.PathLike, params: Any, config: Dinov2Config, source: dict[str, Any]
) -> dict[str, Any]:
  """Writes params + metadata atomically; returns the metadata."""
  meta = {
    "model": "dinov2",
    "config": config.to_dict(),
    "source": dict(source),
    "fingerprint": fingerprint(config, source.get("sha256", "")),
  }
  return params_store.save_params(directory, params, meta, META_NAME)


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  return params_store.load_meta(directory, META_NAME, _MISSING)


def load_encoder(
  directory: str | os.PathLike, shardings: Any | None = None
) -> tuple[Any, Dinov2Config, dict[str, Any]]:
  """Returns `(params, config, metadata)`; params restored onto `shardings` when given."""
  meta = load_metadata(directory)
  config = Dinov2Config.from_dict(meta["config"])
  return params_store.load_params(directory, shardings), config, meta
