"""Atomic file writes, on local disk and on object stores (`gs://`), for every module.

Readers never see half a file: a crash leaves either the old file or the new one. The protocol is
`fae_jax.multihost`'s (the one implementation): on `gs://` one object write (an upload becomes
visible only when complete; rename there is a copy plus a delete, so nothing is renamed); on local
disk a temporary sibling `.<name>.tmp-<pid>` then `replace` (at worst a stale sibling is left,
which the next writer of that name ignores). Paths are `etils.epath` paths.

  write_text_atomic(path, text)     write_bytes_atomic(path, data)
  write_json_atomic(path, obj)      temp_path(path): the local sibling name, for streamed writers

A file every host shares is written by one process (`multihost.is_primary()`). A full disk or a
read-only location raises `storage_errors.StorageError` naming the file and the fix.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from fae_jax import multihost, storage_errors

temp_path = multihost.temp_path


def write_bytes_atomic(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` (parent folders created) atomically (see the module doc)."""
  path = epath.Path(path)
  with storage_errors.writing("writing a file", path, kept=f"The previous {path.name} is intact."):
    path.parent.mkdir(parents=True, exist_ok=True)
    multihost.write_bytes_atomic(path, data)


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """`write_bytes_atomic` of UTF-8 text."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: epath.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
  """Indented JSON (keys sorted unless `sort_keys=False`) with a final newline, atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
