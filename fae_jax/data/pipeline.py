"""grain input pipelines: sharded, shuffled, checkpointable training batches and ordered batches.

Training (`make_dataset`, `make_cache_dataset`)::

  source -> [start:end] -> shuffle (per epoch) -> repeat -> ADM centre crop
    -> random horizontal flip -> this process's rows -> to_iter_dataset (drops corrupt records)
    -> batch -> [mp_prefetch when data.num_workers > 0]

How the processes split the data (`config.data.process_split`):
  * `"global"` (default): ONE seeded stream for the whole job. Global batch `k` is stream
    positions `[k G, (k + 1) G)` with `G = B * process_count`, and process `p` takes rows
    `[p B, (p + 1) B)` of it. The global batches, and so the training run, are the same for any
    number of processes (1 x 8 devices equals 2 x 4, tested), and a job restarted on a slice of
    another size continues the same stream. Every host reads records from every shard.
  * `"shard"`: each process owns whole pieces of the data and shuffles within them. For a cache
    (`make_cache_dataset`) process `p` reads the shard FILES `p, p + P, ...` (the same shards it
    wrote in `encode`), so each host can stage only its own shards on local disk (ImageNet's
    feature cache is ~1 TB; see the README's "Data at scale"); an image source is split by the
    stride `p::P`. The order depends on the process count.

Batches are dicts `{"image": uint8 [B, H, W, 3], "label": int32 [B], "id": int64 [B]}` where
`B = batch_size` is the PER-PROCESS batch: the global batch is `batch_size * process_count`
(each process feeds its shard to `jax.make_array_from_process_local_data`).

Ordered (`make_ordered_dataset`, for the feature/latent caches): no shuffle, no flip, one pass over
`[start, end)`; every process yields the same number of batches, the tail is padded, and a boolean
`valid [B]` marks real entries (padding and corrupt images are `False`).

Every pipeline's iterator is checkpointable: `state = it.get_state()`, and a fresh iterator of the
same dataset with `it2.set_state(state)` yields exactly the batches `it` would have yielded next.
With Orbax, use `checkpoint_save_args(it)` / `checkpoint_restore_args(it)` as the `data` item.

Caches (`make_cache_dataset`) take the same shuffled, repeated, process-split stream of
indices, but read each batch's records together (`_CacheBatchIterator`): grain's per-record
stages cost more than the demo's small steps (README, "Speed of the demo's steps", finding 10).

Config fields read (`config.data`): `process_split` (`"global"` | `"shard"`, above),
`image_size` (int, or None for the native size),
`random_flip` (bool, default False), `num_workers` (grain worker processes, default 0: in-process,
deterministic and cheap on CPU), `read_threads` (default 8), `prefetch_buffer_size` (default 128),
plus the source fields documented in `sources.make_source`.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from fae_jax.data import array_cache
from fae_jax.data import sources as sources_lib

Batch = dict[str, np.ndarray]

# Distinct streams for the seeds derived from the one pipeline seed.
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1


def center_crop_adm(image: np.ndarray, size: int | None) -> np.ndarray:
  """The ADM (guided-diffusion) centre crop, as in `image_datasets.center_crop_arr`.

  Halves the image with BOX resampling while its short side is >= 2 * size, resizes with
  BICUBIC so the short side is `size`, then takes the centre `size x size` crop.

  Args:
    image: uint8 [H, W, 3].
    size: output side; None keeps the image unchanged.

  Returns:
    uint8 [size, size, 3] (or `image` itself when `size` is None or the image is already
    `size x size`, where every ADM step is the identity).
  """
  height, width = image.shape[:2]
  if size is None or (height == size and width == size):
    return image
  pil = Image.fromarray(image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  # Python's round (half to even) on purpose: it is what ADM's reference statistics used.
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  array = np.asarray(pil)
  top = (array.shape[0] - size) // 2
  left = (array.shape[1] - size) // 2
  return np.ascontiguousarray(array[top : top + size, left : left + size])


def _derive_seed(seed: int, *stream: int) -> int:
  """A uint32 seed for one random stream of the pipeline (grain wants seeds < 2**32)."""
  return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


PROCESS_SPLITS = ("global", "shard")


def process_split(data_config: ml_collections.ConfigDict | None) -> str:
  mode = (data_config or {}).get("process_split", "global")
  if mode not in PROCESS_SPLITS:
    raise ValueError(
      f"config.data.process_split={mode!r} is not one of {PROCESS_SPLITS}: 'global' (one stream "
      "for the job, equal for any process count) or 'shard' (each host reads whole shards)."
    )
  return mode


class _ProcessRows(grain.MapDataset):
  """Process `p`'s rows of a global stream: local index `i` -> `(i // B) G + p B + i % B`.

  Global batch `k` is stream positions `[k G, (k + 1) G)`, `G = B * process_count`; process `p`
  holds rows `[p B, (p + 1) B)` of every global batch. A finite stream's last partial global
  batch of `r` rows is split evenly (`r // P` rows each, at most `P - 1` left out), so every
  process sees the same number of examples and runs the same number of steps.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, index: int, count: int):
    super().__init__(parent)
    self._batch, self._index, self._count = batch_size, index, count
    self._full, rest = divmod(len(parent), batch_size * count)
    self._tail = rest // count
    self._length = self._full * batch_size + self._tail

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, r = divmod(index, self._batch)
    if k < self._full:
      return self._parent[(k * self._count + self._index) * self._batch + r]
    tail_start = self._full * self._batch * self._count
    return self._parent[tail_start + self._index * self._tail + r]

  def __str__(self) -> str:
    return f"ProcessRows(batch={self._batch}, process={self._index}/{self._count})"


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  return process_index, process_count


def _index_range(length: int, start_index: int | None, end_index: int | None) -> tuple[int, int]:
  start = 0 if start_index is None else int(start_index)
  end = length if end_index is None else int(end_index)
  if not 0 <= start < end <= length:
    raise ValueError(
      f"Index range [{start_index}, {end_index}) is empty or outside the source's [0, {length})."
    )
  return start, end


def _read_options(data_config: ml_collections.ConfigDict) -> grain.ReadOptions:
  threads = int(data_config.get("read_threads", 8))
  buffer = max(int(data_config.get("prefetch_buffer_size", 128)), threads)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def _maybe_mp_prefetch(
  ds: grain.IterDataset, data_config: ml_collections.ConfigDict
) -> grain.IterDataset:
  num_workers = int(data_config.get("num_workers", 0))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


class _CenterCrop(grain.transforms.Map):
  """Applies `center_crop_adm` to a record's image."""

  def __init__(self, image_size: int | None):
    self.image_size = image_size

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "image": center_crop_adm(record["image"], self.image_size)}


class _RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2; grain seeds `rng` from (seed, element index)."""

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      return {**record, "image": np.ascontiguousarray(record["image"][:, ::-1])}
    return record


def make_dataset(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  start_index: int | None = None,
  end_index: int | None = None,
  source: Any = None,
) -> grain.IterDataset:
  """The training/evaluation pipeline for one process.

  With `data.process_split="global"` (default) every process builds the same seeded stream over
  `[start_index, end_index)` (shuffled differently each epoch, flips seeded by stream position)
  and takes its rows of each global batch (module docstring), so the global batches do not
  depend on the process count. With `"shard"` each process takes the stride
  `process_index::process_count`, truncated so every process has exactly
  `(end - start) // process_count` examples, and shuffles it with `(seed, process_index)`.
  Either way a resumed run sees the same examples and flips.

  Args:
    data_config: `config.data` (see the module docstring for the fields read).
    split: split name passed to the source.
    batch_size: PER-PROCESS batch size; the global batch is `batch_size * process_count`.
    seed: pipeline seed (shuffle and flips).
    shuffle: shuffle within this process's shard, differently each epoch.
    num_epochs: None repeats forever; an int makes the dataset finite.
    drop_remainder: drop the last short batch (only matters when `num_epochs` is an int; epochs
      are concatenated before batching, so a batch may straddle an epoch boundary).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    start_index: first example of the sub-range to read (default 0).
    end_index: end (exclusive) of the sub-range (default: the source's length).
    source: a prebuilt source to use instead of `sources.make_source(data_config, split)`.

  Returns:
    A grain `IterDataset` of batches `{"image": uint8 [B, S, S, 3], "label": int32 [B],
    "id": int64 [B]}`; `iter()` of it gives a checkpointable iterator.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs}.")
  process_index, process_count = _process_defaults(process_index, process_count)
  source = sources_lib.make_source(data_config, split) if source is None else source
  start, end = _index_range(len(source), start_index, end_index)
  per_process = (end - start) // process_count
  if per_process == 0:
    raise ValueError(
      f"{end - start} examples cannot be split over {process_count} processes ({split=})."
    )

  split_mode = process_split(data_config)
  # In 'global' mode the stream is the job's, so no seed depends on the process.
  stream = process_index if split_mode == "shard" else 0
  ds = grain.MapDataset.source(source)[start:end]
  if split_mode == "shard":
    ds = ds[process_index : per_process * process_count : process_count]
  if shuffle:
    ds = ds.shuffle(seed=_derive_seed(seed, _SHUFFLE_STREAM, stream))
  ds = ds.repeat(num_epochs)
  ds = ds.map(_CenterCrop(data_config.get("image_size")))
  if data_config.get("random_flip", False):
    ds = ds.random_map(_RandomFlip(), seed=_derive_seed(seed, _FLIP_STREAM, stream))
  if split_mode == "global":
    ds = _ProcessRows(ds, batch_size, process_index, process_count)
  _log_ownership(
    f"images {split}", split_mode, process_index, process_count, batch_size, end - start
  )
  # Corrupt records are None from here on; to_iter_dataset drops them (the source logs them).
  iter_ds = ds.to_iter_dataset(_read_options(data_config))
  iter_ds = iter_ds.batch(batch_size, drop_remainder=drop_remainder)
  return _maybe_mp_prefetch(iter_ds, data_config)


def ordered_num_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Batches per process that `make_ordered_dataset` yields for `num_examples` examples."""
  return math.ceil(num_examples / (batch_size * process_count))


class _OrderedRecord(grain.transforms.Map):
  """Maps a local position to the record at its global index, or to a masked padding record.

  Local position `i` of process `p` is global index `start + k * G + p * B + r`, with
  `k, r = divmod(i, B)` and `G = B * process_count`: global batch `k` (the process-local batches
  concatenated in process order) is the index range `[start + k * G, start + (k + 1) * G)`.
  """

  def __init__(
    self,
    source: Any,
    start: int,
    end: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    image_size: int | None,
    pad_shape: tuple[int, ...],
  ):
    self.source = source
    self.start = start
    self.end = end
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.image_size = image_size
    self.pad_shape = pad_shape

  def map(self, position: int) -> dict[str, np.ndarray]:
    k, r = divmod(int(position), self.batch_size)
    index = (
      self.start
      + k * self.batch_size * self.process_count
      + self.process_index * self.batch_size
      + r
    )
    record = self.source[index] if index < self.end else None
    if record is None:
      # Padding past `end` gets id -1; a corrupt image keeps its index so the gap is visible.
      return {
        "image": np.zeros(self.pad_shape, np.uint8),
        "label": np.asarray(-1, np.int32),
        "id": np.asarray(index if index < self.end else -1, np.int64),
        "valid": np.asarray(False),
      }
    return {
      **record,
      "image": center_crop_adm(record["image"], self.image_size),
      "valid": np.asarray(True),
    }


def _pad_shape(source: Any, start: int, end: int, image_size: int | None) -> tuple[int, ...]:
  if image_size is not None:
    return (image_size, image_size, 3)
  for index in range(start, end):  # Native size: take it from the first readable record.
    record = source[index]
    if record is not None:
      return tuple(record["image"].shape)
  raise ValueError(f"No readable record in [{start}, {end}) to take the image shape from.")


def make_ordered_dataset(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  start_index: int | None = None,
  end_index: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  source: Any = None,
) -> grain.IterDataset:
  """One ordered, unshuffled, unaugmented pass over `[start_index, end_index)`, for caches.

  Every process yields `ordered_num_batches(end - start, batch_size, process_count)` full
  batches. Global batch `k` (process batches concatenated in process order, as
  `jax.make_array_from_process_local_data` does) covers indices `[start + k*G, start + (k+1)*G)`
  with `G = batch_size * process_count`, so the global stream is in index order. To split the work
  by shard instead, give each process its own range with `process_index=0, process_count=1`.

  Args:
    data_config: `config.data`; `image_size` sets the crop, `num_workers` the worker processes.
    split: split name passed to the source.
    batch_size: per-process batch size.
    start_index: first index (default 0).
    end_index: end (exclusive; default the source's length).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    source: a prebuilt source instead of `sources.make_source(data_config, split)`.

  Returns:
    A grain `IterDataset` of `{"image": uint8 [B, S, S, 3], "label": int32 [B], "id": int64 [B],
    "valid": bool [B]}`; entries with `valid == False` (padding with id -1, or a corrupt image with
    its own id) must be dropped by the consumer.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  process_index, process_count = _process_defaults(process_index, process_count)
  source = sources_lib.make_source(data_config, split) if source is None else source
  start, end = _index_range(len(source), start_index, end_index)
  image_size = data_config.get("image_size")
  num_batches = ordered_num_batches(end - start, batch_size, process_count)
  to_record = _OrderedRecord(
    source,
    start,
    end,
    batch_size,
    process_index,
    process_count,
    image_size,
    _pad_shape(source, start, end, image_size),
  )
  ds = grain.MapDataset.range(num_batches * batch_size).map(to_record)
  iter_ds = ds.to_iter_dataset(_read_options(data_config)).batch(batch_size, drop_remainder=False)
  return _maybe_mp_prefetch(iter_ds, data_config)


def checkpoint_save_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax save args for a grain iterator (e.g. the `data` item of a `CheckpointManager`).

  grain's handler stores the state of this process's iterator as
  `process_<i>-of-<n>.json`, so every process saves and restores its own position.
  """
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax restore args: restores the saved position into `iterator` (a fresh iterator of the
  same pipeline, built with the same config, seed and process layout) in place."""
  return grain.checkpoint.CheckpointRestore(iterator)


def _is_valid(record: dict[str, Any]) -> bool:
  return bool(record.get("valid", 1))


def _log_ownership(
  what: str,
  split_mode: str,
  process_index: int,
  process_count: int,
  batch_size: int,
  num_examples: int,
  shards: list[int] | None = None,
) -> None:
  """Logs which part of the training data this process reads (per-host data ownership)."""
  if split_mode == "global":
    logging.info(
      "data %s: process %d of %d reads rows [%d, %d) of each global batch of %d from one "
      "seeded stream over %d examples (process_split='global').",
      what,
      process_index,
      process_count,
      process_index * batch_size,
      (process_index + 1) * batch_size,
      batch_size * process_count,
      num_examples,
    )
  else:
    logging.info(
      "data %s: process %d of %d reads %s (%d examples; process_split='shard').",
      what,
      process_index,
      process_count,
      f"shard files {shards}"
      if shards is not None
      else f"examples {process_index}::{process_count}",
      num_examples,
    )


def make_cache_dataset(
  source: Any,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
  data_config: ml_collections.ConfigDict | None = None,
) -> grain.IterDataset:
  """Training batches from a cache (`array_cache.CacheSource`: features, latents).

  Same shuffling and checkpointable-iterator contract as `make_dataset`, without the image
  transforms. `data.process_split="global"` (default): one stream for the job, each process
  takes its rows of every global batch. `"shard"`: process `p` reads only the shard files
  `p, p + P, ...` of the cache (whole files, so a host can stage its own shards on local disk),
  shuffled with `(seed, p)`; the shard counts per host may differ by one shard, which only
  matters for finite `num_epochs`. Records whose `valid` field is 0 (images that could not be
  decoded when the cache was written) are dropped after the split.

  Reading: grain computes the stream of source indices; the records of each batch are read and
  decoded together (`source.read_batch` when the source has it, as `CacheSource` and
  `PairedCacheSource` do) by `_CacheBatchIterator`, with no per-record grain stages. With
  `data.read_threads > 0` (default 8) one background thread reads
  `ceil(data.prefetch_buffer_size / batch_size)` batches ahead; with 0 every batch is read in
  `next()`. The batches are those of grain's per-record chain either way (tested).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  process_index, process_count = _process_defaults(process_index, process_count)
  split_mode = process_split(data_config)
  _log_ownership(
    f"cache {getattr(source, 'directory', type(source).__name__)}",
    split_mode,
    process_index,
    process_count,
    batch_size,
    len(source),
    shards=array_cache.owned_shards(source, process_index, process_count)
    if split_mode == "shard" and process_count > 1
    else None,
  )
  if split_mode == "shard" and process_count > 1:
    source = source.subset(array_cache.owned_shards(source, process_index, process_count))
  if len(source) < (process_count if split_mode == "global" else 1):
    raise ValueError(f"{len(source)} cached examples cannot be split over {process_count} hosts.")
  stream = process_index if split_mode == "shard" else 0
  # The stream of source indices: the same shuffle, repeat and process rows as a grain chain
  # over the records would give (tested), read batch by batch.
  positions = grain.MapDataset.range(len(source))
  if shuffle:
    positions = positions.shuffle(seed=_derive_seed(seed, _SHUFFLE_STREAM, stream))
  positions = positions.repeat(num_epochs)
  if split_mode == "global":
    positions = _ProcessRows(positions, batch_size, process_index, process_count)
  data_config = data_config or ml_collections.ConfigDict()
  threads = int(data_config.get("read_threads", 8))
  ahead = -(-int(data_config.get("prefetch_buffer_size", 128)) // batch_size) if threads else 0
  return _CacheBatches(source, positions, batch_size, drop_remainder, ahead)


class _CacheBatches(grain.IterDataset):
  """Batches of a cache source read along a stream of source indices (`_CacheBatchIterator`)."""

  def __init__(self, source, positions, batch_size, drop_remainder, prefetch_batches):
    super().__init__()
    self._source, self._positions = source, positions
    self._batch_size, self._drop_remainder = batch_size, drop_remainder
    self._prefetch_batches = prefetch_batches

  def __iter__(self) -> _CacheBatchIterator:
    return _CacheBatchIterator(
      self._source,
      self._positions,
      self._batch_size,
      self._drop_remainder,
      self._prefetch_batches,
    )

  def __str__(self) -> str:
    return f"CacheBatches(batch={self._batch_size}, prefetch={self._prefetch_batches})"


def _read_rows(source: Any, indices: list[int]) -> Batch:
  """Stacked examples `indices`: the source's own `read_batch` when it has one."""
  if hasattr(source, "read_batch"):
    return source.read_batch(indices)
  records = [source[i] for i in indices]
  records = [r for r in records if r is not None and _is_valid(r)]
  if not records:
    return {"valid": np.zeros(0, np.uint8)}
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


class _CacheBatchIterator(grain.DatasetIterator):
  """Checkpointable batches of a cache: stream positions `pos, pos + 1, ...` -> source indices ->
  one batched read -> rows with `valid == 0` dropped -> the next `batch_size` rows.

  The same batches as grain's per-record chain (`to_iter_dataset().filter(valid).batch(B)` over
  the shuffled, repeated, process-split records; tested), without grain's per-record Python:
  that chain cost 16-23 ms per batch of 64 cached latents on the demo's CPU (its prefetch scans
  its whole read-ahead buffer for every record), this one well under 1 ms (README, "Speed of
  the demo's steps", finding 10). The state is the next batch's first stream position. With
  `prefetch_batches > 0` one background thread reads that many batches ahead, in order; a
  reader error is raised by the `next()` that would have returned its batch.
  """

  def __init__(self, source, positions, batch_size, drop_remainder, prefetch_batches):
    super().__init__()
    self._prefetch_batches = prefetch_batches
    # Holds no reference to the iterator, so the read-ahead thread does not keep a dropped
    # iterator alive (its __del__ stops the thread).
    self._read = functools.partial(_read_batch_at, source, positions, batch_size, drop_remainder)
    self._pos = 0
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._thread: threading.Thread | None = None

  def _stop_prefetch(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._queue = self._stop = self._thread = None

  def __next__(self) -> Batch:
    if not self._prefetch_batches:
      batch, after = self._read(self._pos)
    else:
      if self._thread is None:
        self._queue, self._stop = queue.Queue(self._prefetch_batches), threading.Event()
        self._thread = threading.Thread(
          target=_produce_batches,
          args=(self._read, self._pos, self._queue, self._stop),
          name="fae-jax-cache-reader",
          daemon=True,
        )
        self._thread.start()
      pos, batch, after, error = self._queue.get()
      assert pos == self._pos, (pos, self._pos)
      if error is not None:
        self._stop_prefetch()
        raise error
    if batch is None:
      self._stop_prefetch()
      raise StopIteration
    self._pos = after
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_position": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state) != {"next_position"}:
      raise ValueError(
        f"a cache reader state needs exactly 'next_position', got {sorted(state)} (a checkpoint "
        "of another data pipeline: restart the stage with --redo)."
      )
    self._stop_prefetch()
    self._pos = int(state["next_position"])

  def close(self) -> None:
    self._stop_prefetch()
    super().close()

  def __del__(self):
    if getattr(self, "_stop", None) is not None:
      self._stop.set()


def _read_batch_at(
  source: Any, positions: Any, batch_size: int, drop_remainder: bool, pos: int
) -> tuple[Batch | None, int]:
  """`(the batch starting at stream position pos, the position after it)`; None at the end."""
  length = len(positions)
  parts, rows = [], 0
  while rows < batch_size and pos < length:
    end = min(pos + batch_size - rows, length)
    indices = [int(positions[p]) for p in range(pos, end)]
    pos = end
    part = _read_rows(source, indices)
    keep = part.get("valid")
    if keep is not None and not keep.all():
      part = {k: v[keep.astype(bool)] for k, v in part.items()}
    n = len(next(iter(part.values())))
    if n:
      parts.append(part)
      rows += n
  if not rows or (rows < batch_size and drop_remainder):
    return None, pos
  if len(parts) == 1:
    return parts[0], pos
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, pos


def _produce_batches(read, pos: int, out: queue.Queue, stop: threading.Event) -> None:
  """The read-ahead thread: `(pos, batch, next pos, error)` items in stream order until the end,
  an error or `stop`."""
  while not stop.is_set():
    try:
      batch, after = read(pos)
      item = (pos, batch, after, None)
    except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
      item = (pos, None, pos, e)
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if item[1] is None:
      return
    pos = after


def make_train_image_iter(config: ml_collections.ConfigDict, batch_size: int) -> Any:
  """A checkpointable iterator of this process's shuffled, repeating `{"image"}` training batches
  (`config.data`, `config.seed`): the input of a stage that runs the frozen encoder in its step."""
  ds = make_dataset(
    config.data,
    config.data.train_split,
    batch_size=batch_size,
    seed=config.seed,
    shuffle=True,
    end_index=config.data.max_train_examples,
  )
  return iter(ds.map(lambda b: {"image": b["image"]}))
