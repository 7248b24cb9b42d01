"""A full disk or a read-only workdir, said plainly: which file, why, and how to go on.

Writes of the pipeline (checkpoints, cache shards, exports, JSON files) run inside
`writing(what, path, kept=...)`. When one fails for lack of space (ENOSPC, EDQUOT) or because the
storage refuses writes (EROFS, EACCES, EPERM) the error becomes a `StorageError` (an `OSError`
with the same errno) saying what was being written, the file, the reason, what is intact and the
fix: free space or make the workdir writable, then rerun the same command, which resumes from
what is complete (every writer is atomic: a checkpoint, a shard, an export or a JSON file is
visible only once whole, so a failed write never damages what was there before).

The cause is found anywhere in the exception's chain (`__cause__`, `__context__`, exception
groups), as an errno or, for libraries that raise their own types (Orbax, TensorStore,
ArrayRecord), as the C library's message text. Any other error passes through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_READ_ONLY = {
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied (the location is not writable)",
  errno.EPERM: "operation not permitted (the location is not writable)",
}
REASONS = {**_FULL, **_READ_ONLY}
# strerror texts, for errors that carry the OS message but not the errno.
_TEXTS = {os.strerror(code): code for code in REASONS}


class StorageError(OSError):
  """A write failed because the storage is full or not writable; the message says what to do."""


def cause(exc: BaseException) -> tuple[int, str | None] | None:
  """`(errno, filename)` of the storage failure behind `exc`, or None if there is none."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in REASONS:
      return e.errno, e.filename
    text = str(e)
    for message, code in _TEXTS.items():
      if message in text:
        return code, None
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def explain(what: str, path: os.PathLike | str, code: int, filename: str | None, kept: str) -> str:
  target = filename or os.fspath(path)
  if code in _FULL:
    fix = f"free space on the disk holding {path} (or use a --workdir on a disk with room)"
  else:
    fix = f"make {path} writable (or use a writable --workdir)"
  return (
    f"{what}: cannot write {target}: {REASONS[code]} ({errno.errorcode[code]}). "
    + (f"{kept} " if kept else "")
    + f"Fix: {fix}, then rerun the same command: it resumes from what is complete."
  )


@contextlib.contextmanager
def writing(what: str, path: os.PathLike | str, *, kept: str = "") -> Iterator[None]:
  """Turns a full-disk / read-only failure inside the block into a `StorageError` (module doc).

  Args:
    what: what is being written, e.g. 'fae: checkpoint save'.
    path: the file or directory written (named in the message when the error has no filename).
    kept: what is intact despite the failure, for the message.
  """
  try:
    yield
  except StorageError:
    raise
  except Exception as e:
    found = cause(e)
    if found is None:
      raise
    code, filename = found
    raise StorageError(code, explain(what, path, code, filename, kept)) from e
