"""Atomic file writes: write a temporary sibling, then rename it over the target.

Readers never see half a file: a crash leaves either the old file or the new one (plus, at
worst, a stale `.<name>.tmp-<pid>` sibling that the next writer of that name ignores or removes).
Paths are `etils.epath` paths, so the same calls work on local disks and on `gs://` buckets.

  write_text_atomic(path, text)     write_bytes_atomic(path, data)
  write_json_atomic(path, obj)      temp_path(path): the sibling name, for streamed writers
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def temp_path(path: epath.PathLike) -> epath.Path:
  """The temporary sibling `<dir>/.<name>.tmp-<pid>` a writer fills before renaming it."""
  path = epath.Path(path)
  return path.parent / f".{path.name}.tmp-{os.getpid()}"


def write_bytes_atomic(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` (parent folders created) through a renamed temporary sibling."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path(path)
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """`write_bytes_atomic` of UTF-8 text."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: epath.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
  """Indented JSON (keys sorted unless `sort_keys=False`) with a final newline, atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
