"""On-disk cache of fixed-shape examples: ArrayRecord shards plus a JSON manifest.

Used by the `encode` stage (frozen encoder patch tokens `[N, D]` bfloat16, label, id) and the
`latents` stage (FAE posterior mean and std `[h, w, c]` bfloat16 for each image and its flip).
Every example is a dict of named numpy arrays whose shapes and dtypes are declared up front in a
*spec*: an ordered mapping `name -> (shape, dtype)`, e.g.
`{"features": ((64, 384), "bfloat16"), "label": ((), "int32"), "id": ((), "int64")}`.

Layout of a cache directory::

  shard-00000-of-00010.array_record   # examples [0, S)
  shard-00001-of-00010.array_record   # examples [S, 2S)
  ...
  manifest.json                       # written last: its presence marks the cache complete

Shard `i` holds the examples `[i * S, min((i + 1) * S, total))` of the source split in order,
where `S = examples_per_shard`. Shards are written with ArrayRecord `group_size:1` and no
compression, so a record is read in O(1) with a single seek (bfloat16 features and latents do not
compress usefully and decompression would cost reader CPU on every epoch).

Record format (version 1): one record per example, the concatenation of the raw C-order bytes
of each field in spec order, native little-endian, no header. Because shapes and dtypes are
fixed, field `k` is found at a fixed byte offset; the record length is checked on read. Dtypes are
stored by their numpy name (`"bfloat16"` resolves through `ml_dtypes`).

`manifest.json` holds: `format`, `version`, `total`, `examples_per_shard`, `num_shards`,
`record_bytes`, `shards` (`[{"file", "count", "sha256"}]`), `spec` (`[{"name", "shape", "dtype"}]`, in
order) and the caller's free-form, JSON-serialisable `metadata` (encoder hash and config,
preprocessing, split, dataset name, ...), so a reader decodes without the writer's code.

Atomicity and resume: a shard is written to `.<final name>.tmp-<pid>`, closed, then renamed. On
restart a writer skips the shards whose final file exists with the expected record count and
deletes its own leftover temp files. A full disk or read-only storage while a shard is written
raises `storage_errors.StorageError` (the shard, the reason, the fix); its temp file is removed
and the shard stays pending for the rerun. While the cache is incomplete, each process also leaves a
`writer-<process_index>.json` signature (spec, sizes, metadata); a writer whose signature differs
from any existing one refuses to resume, so shards from two encoder versions are never mixed.
The manifest is written last, via temp file and rename, and the signatures are then removed.

Integrity: each shard's sha256 (of the file's bytes) is computed by its writer when the shard is
closed, kept in a `<shard>.sha256` sidecar until `finalize()` moves it into the manifest.
`verify_shards` re-hashes shard files (a sequential read, ~1 GB/s) and names the truncated or
corrupted ones; `CacheSource(verify=True)` runs it on the shards it reads. A shard that passed is
recorded in a `.verified/<shard>.json` marker with its size and modification time, so each shard
is hashed once, not at every stage start (a changed or re-staged file is hashed again; damage
in place that keeps a verified file's size and modification time is not looked for again).
`discard_shards` deletes bad shards and the manifest, so the writer re-encodes only those.

Multi-host: shard `i` is written by process `i % process_count`. All processes must have finished
their shards before `finalize()` runs on process 0, so the caller syncs hosts first (e.g. with
`multihost_utils.sync_global_devices`); `finalize()` on other processes is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, SupportsIndex

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy, so np.dtype("bfloat16") works)
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from etils import epath

from fae_jax import faults, fileio, storage_errors
from fae_jax.data.cache_integrity import (
  CorruptCacheError,
  checksum_sidecar,
  file_sha256,
  verified_marker,
  verify_shards,
)

FORMAT = "fae_jax.array_cache"
VERSION = 1
MANIFEST = "manifest.json"
# group_size:1 makes every record independently addressable (what grain's random access needs).
WRITER_OPTIONS = "group_size:1,uncompressed"

SpecLike = Mapping[str, tuple[Sequence[int], Any]]


@dataclasses.dataclass(frozen=True)
class Field:
  """One named fixed-shape field of an example."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def normalize_spec(spec: SpecLike) -> tuple[Field, ...]:
  """Turns `{name: (shape, dtype)}` into an ordered tuple of `Field`s."""
  if not spec:
    raise ValueError("cache spec is empty: declare at least one field as name -> (shape, dtype)")
  fields = []
  for name, (shape, dtype) in spec.items():
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
      raise ValueError(f"cache field {name!r} has a negative dimension in shape {shape}")
    fields.append(Field(str(name), shape, np.dtype(dtype)))
  return tuple(fields)


def _spec_to_json(fields: Sequence[Field]) -> list[dict[str, Any]]:
  return [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype.name} for f in fields]


def _spec_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[Field, ...]:
  return tuple(Field(i["name"], tuple(i["shape"]), np.dtype(i["dtype"])) for i in items)


def _canonical(value: Any) -> Any:
  """JSON round trip, so tuples compare equal to the lists read back from disk."""
  return json.loads(json.dumps(value, sort_keys=True))


def encode_example(fields: Sequence[Field], example: Mapping[str, np.ndarray]) -> bytes:
  """Serialises one example: raw bytes of each field in spec order."""
  return b"".join(np.ascontiguousarray(example[f.name]).tobytes() for f in fields)


def decode_example(fields: Sequence[Field], record: bytes) -> dict[str, np.ndarray]:
  """Inverse of `encode_example`; returns writable arrays (one copy of the record)."""
  buffer = bytearray(record)
  out, offset = {}, 0
  for f in fields:
    count = math.prod(f.shape)
    out[f.name] = np.frombuffer(buffer, f.dtype, count, offset).reshape(f.shape)
    offset += f.nbytes
  if offset != len(buffer):
    raise ValueError(f"cache record has {len(buffer)} bytes but the spec needs {offset}")
  return out


def shard_name(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}.array_record"


def read_manifest(directory: str | os.PathLike, *, stage: str = "encode") -> dict[str, Any]:
  """Returns the parsed manifest; fails with the fix when the cache is incomplete."""
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(
      f"cache at {directory} is incomplete (no {MANIFEST}): rerun the {stage} stage"
    )
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(
      f"cache at {directory} has format {manifest.get('format')!r} version "
      f"{manifest.get('version')!r}; this code reads {FORMAT!r} version {VERSION}: delete "
      f"{directory} and rerun the {stage} stage"
    )
  return manifest


def is_complete(directory: str | os.PathLike) -> bool:
  """True when the cache's manifest exists (it is written after every shard)."""
  return (epath.Path(directory) / MANIFEST).exists()


def _check_metadata(
  directory: str | os.PathLike,
  stored: Mapping[str, Any],
  expected: Mapping[str, Any],
  *,
  stage: str,
  exact: bool,
) -> None:
  """Raises naming the first key whose stored and expected values differ."""
  stored, expected = _canonical(dict(stored)), _canonical(dict(expected))
  keys = sorted(set(stored) | set(expected)) if exact else sorted(expected)
  missing = object()
  for key in keys:
    have, want = stored.get(key, missing), expected.get(key, missing)
    if have != want:
      have_s = "<absent>" if have is missing else repr(have)
      want_s = "<absent>" if want is missing else repr(want)
      raise ValueError(
        f"cache at {directory} was built with {key}={have_s} but {key}={want_s} is expected now: "
        f"delete {directory} and rerun the {stage} stage"
      )


def discard_shards(directory: str | os.PathLike, shards: Sequence[int]) -> None:
  """Deletes `shards` and the manifest, so a `CacheWriter` re-encodes exactly those shards.

  The writer signatures are rebuilt from the manifest first, so the resumed writer still refuses
  to mix in shards from another encoder or config.
  """
  directory = epath.Path(directory)
  manifest = read_manifest(directory)
  for shard in shards:
    name = manifest["shards"][shard]["file"]
    (directory / name).unlink(missing_ok=True)
    verified_marker(directory, name).unlink(missing_ok=True)
  for shard, entry in enumerate(manifest["shards"]):
    if shard not in shards and entry.get("sha256"):
      # The good shards keep their checksums for the next finalize().
      fileio.write_text_atomic(checksum_sidecar(directory / entry["file"]), entry["sha256"])
  (directory / MANIFEST).unlink(missing_ok=True)


def _num_records(path: epath.Path) -> int:
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


class ShardWriter:
  """Streams one shard, batch by batch, to a temp file; renames it only on success.

  Use as a context manager. On an exception (or a wrong final count) the temp file is deleted
  and the shard stays pending.
  """

  def __init__(self, cache: CacheWriter, shard: int):
    self._cache = cache
    self.shard = shard
    self.start, self.end = cache.shard_range(shard)
    self.path = cache.shard_path(shard)
    self._tmp = fileio.temp_path(self.path)
    self._writer = None
    self.count = 0

  def _storage(self):
    kept = "Complete shards are intact; this one stays pending (its partial file is removed)."
    return storage_errors.writing(f"cache shard {self.shard}", self.path, kept=kept)

  def __enter__(self) -> ShardWriter:
    with self._storage():
      self._writer = array_record_module.ArrayRecordWriter(os.fspath(self._tmp), WRITER_OPTIONS)
    return self

  def write(self, batch: Mapping[str, np.ndarray]) -> None:
    """Appends a batch: each field `[B, *shape]` with the spec's exact dtype."""
    if self._writer is None:
      raise RuntimeError("ShardWriter.write called outside its `with` block")
    fields = self._cache.fields
    if set(batch) != {f.name for f in fields}:
      raise ValueError(
        f"batch fields {sorted(batch)} do not match the cache spec {[f.name for f in fields]}"
      )
    arrays = {f.name: np.asarray(batch[f.name]) for f in fields}
    size = None
    for f in fields:
      a = arrays[f.name]
      if a.dtype != f.dtype or a.ndim != len(f.shape) + 1 or a.shape[1:] != f.shape:
        raise ValueError(
          f"cache field {f.name!r}: got {a.dtype}{list(a.shape)}, expected "
          f"{f.dtype}[B, {', '.join(map(str, f.shape))}]"
        )
      if size is None:
        size = a.shape[0]
      elif a.shape[0] != size:
        raise ValueError(f"batch fields have different leading sizes ({size} vs {a.shape[0]})")
    if self.count + size > self.end - self.start:
      raise ValueError(
        f"shard {self.shard} holds {self.end - self.start} examples; writing {size} more after "
        f"{self.count} overflows it"
      )
    # One [B, record_bytes] byte matrix, so each record is a single row copy.
    rows = np.concatenate(
      [
        np.ascontiguousarray(arrays[f.name]).reshape(size, math.prod(f.shape)).view(np.uint8)
        for f in fields
      ],
      axis=1,
    )
    with self._storage():
      for row in rows:
        self._writer.write(row.tobytes())
    self.count += size

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: types.TracebackType | None,
  ) -> None:
    writer, self._writer = self._writer, None
    try:
      with self._storage():
        writer.close()
    except storage_errors.StorageError:
      self._tmp.unlink(missing_ok=True)
      if exc_type is None:
        raise
    expected = self.end - self.start
    if exc_type is None and self.count != expected:
      self._tmp.unlink(missing_ok=True)
      raise ValueError(f"shard {self.shard} got {self.count} examples, expected {expected}")
    if exc_type is not None:
      self._tmp.unlink(missing_ok=True)
      return
    # Checksum first: a shard file that exists under its final name always has its sidecar.
    fileio.write_text_atomic(checksum_sidecar(self.path), file_sha256(self._tmp))
    faults.point("cache:shard_before_rename", self.path)
    self._tmp.replace(self.path)
    faults.point("cache:shard_done", self.path)


class CacheWriter:
  """Writes (or resumes writing) a cache; see the module docstring for the layout.

  Typical stage code::

    writer = CacheWriter(dir, spec, total, 4096, process_index=jax.process_index(),
                         process_count=jax.process_count(), metadata={...})
    for shard in writer.pending_shards():
      start, end = writer.shard_range(shard)
      with writer.open_shard(shard) as out:
        for batch in batches(start, end):
          out.write(batch)
    sync_hosts()   # the caller's barrier, on multi-host
    writer.finalize()
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    spec: SpecLike,
    total: int,
    examples_per_shard: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    metadata: Mapping[str, Any],
    stage: str = "encode",
  ):
    if total <= 0 or examples_per_shard <= 0:
      raise ValueError(
        f"cache needs total > 0 and examples_per_shard > 0, got {total} and {examples_per_shard}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.directory = epath.Path(directory)
    self.fields = normalize_spec(spec)
    self.total = int(total)
    self.examples_per_shard = int(examples_per_shard)
    self.num_shards = -(-self.total // self.examples_per_shard)
    self.process_index = process_index
    self.process_count = process_count
    self.metadata = _canonical(dict(metadata))
    self.stage = stage
    self.directory.mkdir(parents=True, exist_ok=True)

    signature = self._signature()
    if is_complete(self.directory):
      self._check_signature(read_manifest(self.directory, stage=stage), "manifest.json")
      return
    for path in sorted(self.directory.glob("writer-*.json")):
      self._check_signature(json.loads(path.read_text()), path.name)
    fileio.write_json_atomic(
      self.directory / f"writer-{process_index:05d}.json", signature, sort_keys=False
    )
    # Only this process's files: another host may be writing its own temp files right now.
    # `.<name>.tmp-*` (fae_jax.fileio) and `<name>.tmp-*` (caches written before it).
    names = [shard_name(s, self.num_shards) for s in self._owned_shards()]
    if process_index == 0:
      names.append(MANIFEST)
    patterns = [f"{dot}{name}.tmp-*" for name in names for dot in ("", ".")]
    for pattern in patterns:
      for tmp in self.directory.glob(pattern):
        tmp.unlink(missing_ok=True)

  def _signature(self) -> dict[str, Any]:
    return {
      "total": self.total,
      "examples_per_shard": self.examples_per_shard,
      "spec": _spec_to_json(self.fields),
      "metadata": self.metadata,
    }

  def _check_signature(self, other: Mapping[str, Any], source: str) -> None:
    mine = self._signature()
    for key in ("total", "examples_per_shard", "spec"):
      if _canonical(other.get(key)) != _canonical(mine[key]):
        raise ValueError(
          f"cache at {self.directory} ({source}) has {key}={other.get(key)!r} but this run has "
          f"{key}={mine[key]!r}: delete {self.directory} and rerun the {self.stage} stage"
        )
    _check_metadata(
      self.directory, other.get("metadata", {}), self.metadata, stage=self.stage, exact=True
    )

  def _owned_shards(self) -> range:
    return range(self.process_index, self.num_shards, self.process_count)

  def shard_path(self, shard: int) -> epath.Path:
    return self.directory / shard_name(shard, self.num_shards)

  def shard_range(self, shard: int) -> tuple[int, int]:
    """Returns `[start, end)`: the source example indices held by `shard`."""
    if not 0 <= shard < self.num_shards:
      raise IndexError(f"shard {shard} not in [0, {self.num_shards})")
    start = shard * self.examples_per_shard
    return start, min(start + self.examples_per_shard, self.total)

  def _shard_done(self, shard: int) -> bool:
    path = self.shard_path(shard)
    if not path.exists():
      return False
    start, end = self.shard_range(shard)
    return _num_records(path) == end - start

  def pending_shards(self) -> list[int]:
    """Shards this process still has to write (complete ones on disk are skipped)."""
    if is_complete(self.directory):
      return []
    return [s for s in self._owned_shards() if not self._shard_done(s)]

  def open_shard(self, shard: int) -> ShardWriter:
    """Returns a context manager that streams `shard` batch by batch, atomically."""
    if shard % self.process_count != self.process_index:
      raise ValueError(
        f"shard {shard} belongs to process {shard % self.process_count}, not "
        f"{self.process_index} (of {self.process_count})"
      )
    self.shard_range(shard)  # Validates the index.
    return ShardWriter(self, shard)

  def write_shard(self, shard: int, examples: Mapping[str, np.ndarray]) -> None:
    """Writes a whole shard at once: every field `[shard length, *shape]`."""
    with self.open_shard(shard) as out:
      out.write(examples)

  def finalize(self) -> None:
    """On process 0, checks every shard and writes the manifest; a no-op elsewhere.

    On multi-host the caller must sync all processes before calling this.
    """
    if self.process_index != 0 or is_complete(self.directory):
      return
    missing = [s for s in range(self.num_shards) if not self._shard_done(s)]
    if missing:
      raise RuntimeError(
        f"cache at {self.directory}: shards {missing} are missing or incomplete; every process "
        f"must finish its shards (and hosts must be synced) before finalize()"
      )
    shards = []
    for s in range(self.num_shards):
      start, end = self.shard_range(s)
      path = self.shard_path(s)
      sidecar = checksum_sidecar(path)
      # A shard from before checksums existed (a resumed old cache) is hashed here.
      sha = sidecar.read_text().strip() if sidecar.exists() else file_sha256(path)
      shards.append({"file": shard_name(s, self.num_shards), "count": end - start, "sha256": sha})
    manifest = {
      "format": FORMAT,
      "version": VERSION,
      "total": self.total,
      "examples_per_shard": self.examples_per_shard,
      "num_shards": self.num_shards,
      "record_bytes": sum(f.nbytes for f in self.fields),
      "shards": shards,
      "spec": _spec_to_json(self.fields),
      "metadata": self.metadata,
    }
    fileio.write_json_atomic(self.directory / MANIFEST, manifest, sort_keys=False)
    for path in self.directory.glob("writer-*.json"):
      path.unlink(missing_ok=True)
    for path in self.directory.glob("*.array_record.sha256"):
      path.unlink(missing_ok=True)


class CacheSource:
  """A grain `RandomAccessDataSource` over a complete cache: `source[i]` is example `i`.

  Readers open lazily and are dropped on pickling (grain workers reopen them), so the source is
  cheap to construct and picklable. With `verify=True` (default) the shard files are checked
  against the manifest's checksums first (each shard hashed once, see `verify_shards`), so a
  truncated or corrupted shard stops the run with `CorruptCacheError` naming it, instead of a
  reader error deep inside the data loader.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    expected_metadata: Mapping[str, Any] | None = None,
    stage: str = "encode",
    verify: bool = True,
  ):
    self.directory = epath.Path(directory)
    self.manifest = read_manifest(self.directory, stage=stage)
    self.metadata = self.manifest["metadata"]
    if expected_metadata is not None:
      _check_metadata(directory, self.metadata, expected_metadata, stage=stage, exact=False)
    if verify:
      bad = verify_shards(self.directory, self.manifest)
      if bad:
        raise CorruptCacheError(self.directory, bad, stage)
    self.fields = _spec_from_json(self.manifest["spec"])
    self.stage = stage
    self.shards = tuple(range(len(self.manifest["shards"])))
    self._open(self.shards)
    if len(self._source) != self.manifest["total"]:
      raise ValueError(
        f"cache at {directory}: shards hold {len(self._source)} examples, manifest says "
        f"{self.manifest['total']}; delete it and rerun the {stage} stage"
      )

  def _open(self, shards: Sequence[int]) -> None:
    # Counts from the manifest as `path[start:end]` instructions: nothing is opened here.
    entries = [self.manifest["shards"][i] for i in shards]
    paths = [f"{os.fspath(self.directory / e['file'])}[0:{e['count']}]" for e in entries]
    self._source = array_record_data_source.ArrayRecordDataSource(paths)

  def subset(self, shards: Sequence[int]) -> CacheSource:
    """The same cache restricted to whole shard files `shards` (in that order), re-indexed."""
    num_shards = len(self.manifest["shards"])
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad or not shards:
      raise ValueError(
        f"cache at {self.directory}: shards {list(shards)} not in [0, {num_shards})."
      )
    sub = object.__new__(CacheSource)
    sub.__dict__.update(self.__dict__)
    sub.shards = tuple(shards)
    sub._open(sub.shards)
    return sub

  @property
  def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {f.name: (f.shape, f.dtype) for f in self.fields}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"cache index {index} not in [0, {len(self)})")
    return decode_example(self.fields, self._source[index])

  def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict[str, np.ndarray]]:
    return [decode_example(self.fields, r) for r in self._source.__getitems__(indices)]

  def read_batch(self, indices: Sequence[SupportsIndex]) -> dict[str, np.ndarray]:
    """Examples `indices` as one dict of stacked arrays `{field: [len(indices), *shape]}`.

    The same values as `np.stack` over `source[i]`, decoded as one `[n, record_bytes]` buffer
    (one copy per field) instead of record by record: the training batches' reader
    (`pipeline.make_cache_dataset`) spends no Python per example here.
    """
    indices = [i.__index__() for i in indices]
    bad = [i for i in indices if not 0 <= i < len(self)]
    if bad:
      raise IndexError(f"cache indices {bad[:5]} not in [0, {len(self)})")
    records = self._source.__getitems__(indices) if indices else []
    width = sum(f.nbytes for f in self.fields)
    wrong = {len(r) for r in records} - {width}
    if wrong:
      raise ValueError(f"cache records of {sorted(wrong)} bytes, but the spec needs {width}")
    rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), width)
    out, offset = {}, 0
    for f in self.fields:
      column = np.ascontiguousarray(rows[:, offset : offset + f.nbytes])
      out[f.name] = column.view(f.dtype).reshape(len(records), *f.shape)
      offset += f.nbytes
    return out

  def shard_files(self) -> list[str]:
    """The shard file names this source reads (all of them, or a `subset`'s)."""
    return [self.manifest["shards"][i]["file"] for i in self.shards]

  def __repr__(self) -> str:
    return f"CacheSource({os.fspath(self.directory)!r}, n={len(self)}, shards={len(self.shards)})"


def owned_shards(source: CacheSource, process_index: int, process_count: int) -> list[int]:
  """Whole shards read by `process_index` of `process_count`: `p, p + P, ...` (the writer's rule).

  Disjoint across processes, covering every shard; refuses a cache with fewer shards than
  processes (a host would read nothing), naming the fix.
  """
  num_shards = len(source.manifest["shards"])
  if num_shards < process_count:
    raise ValueError(
      f"cache at {source.directory} has {num_shards} shards for {process_count} processes: with "
      "config.data.process_split='shard' every host reads whole shards, so it needs at least one "
      "shard per process. Re-encode with a smaller encode.examples_per_shard (at most "
      f"{source.manifest['total'] // process_count}) or use process_split='global'."
    )
  return list(range(process_index, num_shards, process_count))
