"""Shard checksums of the array cache: hashing, the per-shard sidecar and verified markers, and
the error that names the bad shards (`fae_jax.data.array_cache`, "Integrity", has the contract).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from fae_jax import fileio

_HASH_CHUNK = 8 << 20
VERIFIED_DIR = ".verified"


class CorruptCacheError(ValueError):
  """Shards whose bytes do not match the manifest's checksums (truncated or corrupted)."""

  def __init__(self, directory: epath.Path, bad: Mapping[int, str], stage: str):
    self.directory, self.bad, self.stage = directory, dict(bad), stage
    lines = "; ".join(f"shard {s}: {why}" for s, why in sorted(self.bad.items()))
    super().__init__(
      f"cache at {directory}: {len(self.bad)} shard(s) are truncated or corrupted ({lines}). "
      f"Rerun the {stage} stage: it re-encodes only these shards and keeps the good ones "
      f"(or delete {directory} to rebuild it all)."
    )


def file_sha256(path: epath.PathLike) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while block := f.read(_HASH_CHUNK):
      h.update(block)
  return h.hexdigest()


def checksum_sidecar(path: epath.Path) -> epath.Path:
  return path.parent / f"{path.name}.sha256"


def verified_marker(directory: epath.Path, file: str) -> epath.Path:
  return directory / VERIFIED_DIR / f"{file}.json"


def file_identity(path: epath.Path, sha256: str) -> dict[str, Any]:
  stat = path.stat()
  return {"sha256": sha256, "size": int(stat.length), "mtime": float(stat.mtime)}


def verify_shards(
  directory: str | os.PathLike, manifest: Mapping[str, Any], shards: Sequence[int] | None = None
) -> dict[int, str]:
  """Re-hashes shard files against the cache's manifest (its parsed `manifest.json`); returns
  `{shard: reason}` for the bad ones.

  Shards without a recorded checksum (caches written before checksums existed) are skipped.
  A shard already verified with the same size and mtime is not hashed again.
  """
  directory = epath.Path(directory)
  entries = manifest["shards"]
  bad: dict[int, str] = {}
  for shard in range(len(entries)) if shards is None else shards:
    entry = entries[shard]
    want = entry.get("sha256")
    if not want:
      continue
    path = directory / entry["file"]
    if not path.exists():
      bad[shard] = f"{entry['file']} is missing"
      continue
    marker = verified_marker(directory, entry["file"])
    identity = file_identity(path, want)
    try:
      if marker.exists() and json.loads(marker.read_text()) == identity:
        continue
    except (ValueError, OSError):
      pass  # an unreadable marker only costs a re-hash
    have = file_sha256(path)
    if have != want:
      bad[shard] = (
        f"{entry['file']} has sha256 {have[:12]}..., the manifest {want[:12]}... "
        f"({identity['size']:,} bytes)"
      )
      continue
    try:
      fileio.write_json_atomic(marker, identity)
    except OSError:
      pass  # a read-only cache is verified at every open instead
  return bad
