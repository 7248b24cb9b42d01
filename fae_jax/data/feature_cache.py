"""The feature and latent caches on disk: paths, metadata, readers and the image -> cache writer.

`<root>/features/<split>/` (written by the `encode` stage) is an ArrayRecord cache
(`fae_jax.data.array_cache`) of the frozen encoder's patch tokens (bfloat16 `[N, D]`), labels,
example ids and a `valid` flag (0 for an image that could not be decoded; counted, logged and
skipped by readers). The manifest records the encoder fingerprint and the preprocessing
(`cache_metadata`), so a reader never gets features of another encoder.
`<workdir>/latents/train/` (the `latents` stage) holds FAE posteriors in the same format, with
per-channel statistics in `latents/stats.json`.

The writer (`write_image_cache`) is multi-host: shard `i` belongs to process
`i % process_count`, and each process computes its own shards on its local devices (no
cross-host communication); hosts meet at a barrier before process 0 writes the manifest, and
again after it (no host reads the cache before its manifest exists). Each process logs the shards
and example ids it owns (`<what> <split>: process p of P owns shards [...]`, then one line per
shard with the ids it encoded), and the returned counts are summed over hosts.
Resumable at shard granularity: after a restart, complete shards are skipped and a partial shard
is rewritten from its start. NaN/Inf computed outputs are refused shard by shard, with the example
ids (`fae_jax.data.finite_check`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from fae_jax import multihost, sharding
from fae_jax.data import array_cache, finite_check, pipeline, sources
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range

ENCODE_STAGE = "encode"  # the stage that writes the feature cache, named in errors
FEATURES = "features"
LATENTS_STAGE = "latents"
LATENT_STATS = "stats.json"


def split_name(config: ml_collections.ConfigDict, split_key: str) -> str:
  """'train' / 'eval' -> the dataset's split name from `config.data`."""
  if split_key == "train":
    return config.data.train_split
  if split_key == "eval":
    return config.data.eval_split
  raise ValueError(f"config.encode.splits entries must be 'train' or 'eval', got {split_key!r}.")


def split_limit(config: ml_collections.ConfigDict, split_key: str) -> int | None:
  return config.data.max_train_examples if split_key == "train" else config.data.max_eval_examples


def cache_dir(root: epath.Path, split_key: str) -> epath.Path:
  """`<root>/features/<split_key>`; `root` is a workdir (or its `config.upstream_workdir`)."""
  return epath.Path(root) / FEATURES / split_key


def cache_metadata(
  config: ml_collections.ConfigDict, encoder_meta: dict[str, Any], split_key: str
) -> dict[str, Any]:
  """What must match for a cached feature to be reused (checked by every reader)."""
  return {
    "encoder_fingerprint": encoder_meta["fingerprint"],
    "encoder_random": bool(encoder_meta["source"].get("random")),
    "encoder_image_size": int(config.encoder.image_size),
    "features": config.encoder.features,
    "dataset": config.data.name,
    "split": split_name(config, split_key),
    "data_image_size": config.data.image_size,
  }


def feature_cache_source(
  root: epath.PathLike,
  config: ml_collections.ConfigDict,
  split_key: str,
  encoder_meta: dict[str, Any],
  consumer: str,
) -> array_cache.CacheSource:
  """The complete feature cache of a split under `root`, checked against the encoder and config.

  `consumer` is the config section that reads it (e.g. 'fae', 'pixel'), named in the error.
  """
  directory = cache_dir(root, split_key)
  if not array_cache.is_complete(directory):
    raise FileNotFoundError(
      f"The feature cache {directory} is missing or incomplete: run the `encode` stage first "
      f"(add 'encode' to config.stages), or set config.{consumer}.input='encoder' to encode on "
      "the fly."
    )
  expected = cache_metadata(config, encoder_meta, split_key)
  return array_cache.CacheSource(directory, expected_metadata=expected, stage=ENCODE_STAGE)


def cache_spec(spec: EncoderSpec) -> dict[str, tuple[tuple[int, ...], str]]:
  return {"features": ((spec.num_tokens, spec.feature_dim), "bfloat16")}


def make_encode_fn(spec: EncoderSpec, dtype) -> Any:
  """`(params, uint8 images [B, H, W, 3]) -> {"features": bfloat16 [B, N, D]}` (to be jitted)."""

  def fn(params, images):
    feats = encode_images(spec, params, images_to_model_range(images), dtype=dtype)
    return {"features": feats.astype(jnp.bfloat16)}

  return fn


class Progress:
  """Logs examples/s and the ETA every `every` seconds."""

  def __init__(self, total: int, what: str, every: float):
    self.total, self.what, self.every = total, what, every
    self.done = 0
    self.t_start = time.time()
    self.t_first = None  # after the first batch: excludes compilation from the rate
    self.done_first = 0
    self.t_log = self.t_start

  def update(self, n: int) -> None:
    self.done += n
    now = time.time()
    if self.t_first is None:
      self.t_first, self.done_first = now, self.done
      return
    if now - self.t_log >= self.every or self.done >= self.total:
      self.t_log = now
      rate = self.rate()
      eta = (self.total - self.done) / rate if rate > 0 else float("nan")
      logging.info(
        "%s: %d/%d examples, %.1f examples/s, ETA %.0f s",
        self.what,
        self.done,
        self.total,
        rate,
        eta,
      )

  def rate(self) -> float:
    if self.t_first is None:
      return 0.0
    dt = time.time() - self.t_first
    n = self.done - self.done_first
    if n <= 0 or dt <= 0:  # a single batch: fall back to the total including compilation
      dt, n = time.time() - self.t_start, self.done
    return n / dt if dt > 0 else 0.0


def write_image_cache(
  config: ml_collections.ConfigDict,
  directory: epath.Path,
  split_key: str,
  *,
  spec: dict[str, tuple[tuple[int, ...], str]],
  metadata: dict[str, Any],
  compute_fn: Any,
  params: Any,
  what: str,
  devices: Sequence[jax.Device] | None = None,
  stop_after_shards: int | None = None,
) -> dict[str, Any]:
  """Runs `compute_fn(params, uint8 images)` over a split and caches its outputs per example.

  `spec` names the computed fields (plus `label`, `id`, `valid`, added here) with their shapes and
  dtypes; `compute_fn` returns a dict of `[B, ...]` arrays already in those dtypes. Shared by the
  `encode` (features) and `latents` (FAE posteriors) stages. `stop_after_shards` (tests) stops
  after writing that many shards, like an interrupted run.
  """
  split = split_name(config, split_key)
  source = sources.make_source(config.data, split)
  total = len(source)
  limit = split_limit(config, split_key)
  if limit is not None:
    total = min(total, int(limit))
  spec = {**spec, "label": ((), "int32"), "id": ((), "int64"), "valid": ((), "uint8")}
  writer = array_cache.CacheWriter(
    directory,
    spec,
    total,
    int(config.encode.examples_per_shard),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    metadata=metadata,
    stage=what,
  )
  mesh = sharding.make_mesh(devices=list(devices or jax.local_devices()))
  batch_size = int(config.encode.batch_size) // jax.process_count()
  if batch_size % mesh.size:
    raise ValueError(
      f"config.encode.batch_size={config.encode.batch_size} gives {batch_size} per process, "
      f"not divisible by the {mesh.size} local devices; use a multiple of {mesh.size}."
    )
  batch = sharding.batch_sharding(mesh)
  fn = jax.jit(compute_fn, in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)
  params = jax.device_put(params, sharding.replicated(mesh))
  pending = writer.pending_shards()
  owned = range(writer.process_index, writer.num_shards, writer.process_count)
  todo = sum(writer.shard_range(s)[1] - writer.shard_range(s)[0] for s in pending)
  logging.info(
    "%s %s: process %d of %d owns shards %s (examples %s); %s still to write.",
    what,
    split_key,
    jax.process_index(),
    jax.process_count(),
    list(owned),
    " ".join("[{}, {})".format(*writer.shard_range(s)) for s in owned),
    list(pending),
  )
  logging.info(
    "%s %s (%s): %d examples in %d shards, %d shards (%d examples) to do on this process.",
    what,
    split_key,
    split,
    total,
    -(-total // int(config.encode.examples_per_shard)),
    len(pending),
    todo,
  )
  progress = Progress(todo, f"{what}/{split_key}", float(config.encode.log_every_seconds))
  num_invalid = 0
  for count, shard in enumerate(pending):
    if stop_after_shards is not None and count >= stop_after_shards:
      return {"interrupted": True}
    start, end = writer.shard_range(shard)
    ds = pipeline.make_ordered_dataset(
      config.data,
      split,
      batch_size=batch_size,
      start_index=start,
      end_index=end,
      process_index=0,
      process_count=1,
      source=source,
    )
    ids, bad, bad_fields = [], [], set()
    with writer.open_shard(shard) as out:
      for records in ds:
        # A local-mesh sharding: fine for host data with any process count (jit refuses numpy
        # with a non-trivial sharding once there are several processes).
        images = jax.device_put(np.asarray(records["image"]), batch)
        outputs = jax.device_get(fn(params, images))
        keep = records["id"] >= 0  # drops padding past the shard's end
        valid = np.asarray(records["valid"])[keep]
        num_invalid += int((~valid).sum())
        row = {k: np.asarray(v)[keep] for k, v in outputs.items()}
        row["label"] = np.asarray(records["label"], np.int32)[keep]
        row["id"] = np.asarray(records["id"], np.int64)[keep]
        row["valid"] = valid.astype(np.uint8)
        ids_bad, fields = finite_check.bad_ids({k: row[k] for k in outputs}, row["id"])
        bad.append(ids_bad)
        bad_fields |= fields
        out.write(row)
        ids.append(row["id"])
        progress.update(int(keep.sum()))
      finite_check.refuse(what, split_key, shard, bad, bad_fields, config)  # before the commit
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    logging.info(
      "%s %s: process %d wrote shard %d: %d examples, ids %s",
      what,
      split_key,
      jax.process_index(),
      shard,
      len(ids),
      _ranges(ids),
    )
  if num_invalid:
    logging.warning(
      "%s %s: %d image(s) could not be decoded; cached with valid=0 and skipped by readers.",
      what,
      split_key,
      num_invalid,
    )
  multihost.barrier(f"{what}:{split_key}:written")
  writer.finalize()  # process 0: the manifest
  multihost.barrier(f"{what}:{split_key}:finalized")
  rate = progress.rate()
  logging.info(
    "%s %s: done, %d examples this run on this process at %.1f examples/s -> %s",
    what,
    split_key,
    progress.done,
    rate,
    directory,
  )
  # Hosts encode in parallel: the job's counts and rate are the sums over hosts.
  encoded, rate, num_invalid = multihost.sum_over_processes(
    np.asarray([progress.done, rate, num_invalid], np.float64)
  )
  return {
    "num_examples": total,
    "encoded": int(encoded),
    "rate": float(rate),
    "invalid": int(num_invalid),
  }


def _ranges(ids: np.ndarray) -> str:
  """Sorted ids as contiguous ranges: [0, 1, 2, 5] -> '[0, 3) [5, 6)'."""
  ids = np.sort(np.asarray(ids, np.int64))
  if not len(ids):
    return "none"
  cuts = np.nonzero(np.diff(ids) != 1)[0] + 1
  return " ".join(f"[{r[0]}, {r[-1] + 1})" for r in np.split(ids, cuts))


def encode_split(
  config: ml_collections.ConfigDict,
  root: epath.Path,
  split_key: str,
  *,
  params: Any,
  spec: EncoderSpec,
  encoder_meta: dict[str, Any],
  devices: Sequence[jax.Device] | None = None,
  stop_after_shards: int | None = None,
) -> dict[str, Any]:
  """Encodes one split into `<root>/features/<split_key>`; returns counts and throughput."""
  return write_image_cache(
    config,
    cache_dir(root, split_key),
    split_key,
    spec=cache_spec(spec),
    metadata=cache_metadata(config, encoder_meta, split_key),
    compute_fn=make_encode_fn(spec, jnp.dtype(config.encoder.dtype)),
    params=params,
    what=ENCODE_STAGE,
    devices=devices,
    stop_after_shards=stop_after_shards,
  )


# ----------------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------------


def feature_batches(
  root: epath.PathLike,
  config: ml_collections.ConfigDict,
  split_key: str,
  *,
  max_examples: int | None,
  batch_size: int,
  encoder: tuple[Any, EncoderSpec, dict[str, Any]],
  from_cache: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Ordered `(features float32 [B, N, D], labels [B])` of a split's valid examples.

  From the feature cache under `root` (`from_cache`), else the frozen encoder
  `encoder = (params, spec, meta)` runs on the images.
  """
  params, spec, meta = encoder
  if from_cache:
    source = feature_cache_source(root, config, split_key, meta, "fae")
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    ds = grain.MapDataset.source(source)[:n].to_iter_dataset().batch(batch_size)
    for batch in ds:
      keep = batch["valid"].astype(bool)
      yield batch["features"][keep].astype(np.float32), batch["label"][keep]
    return
  limits = [v for v in (max_examples, split_limit(config, split_key)) if v is not None]
  fn = jax.jit(lambda p, im: encode_images(spec, p, images_to_model_range(im)))
  ds = pipeline.make_ordered_dataset(
    config.data,
    split_name(config, split_key),
    batch_size=batch_size,
    end_index=min(limits) if limits else None,
    process_index=0,
    process_count=1,
  )
  for batch in ds:
    keep = batch["valid"].astype(bool)
    yield np.asarray(fn(params, batch["image"]))[keep], batch["label"][keep]


def latent_cache_dir(workdir: epath.PathLike, split_key: str = "train") -> epath.Path:
  """`<workdir>/latents/<split_key>`: the `latents` stage's posterior cache."""
  return epath.Path(workdir) / LATENTS_STAGE / split_key


def latent_source(workdir: epath.PathLike) -> array_cache.CacheSource:
  """The complete latent cache of the training split."""
  directory = latent_cache_dir(workdir)
  if not array_cache.is_complete(directory):
    raise FileNotFoundError(
      f"The latent cache {directory} is missing or incomplete: run the `latents` stage first."
    )
  return array_cache.CacheSource(directory, stage=LATENTS_STAGE)


def latent_stats_path(workdir: epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / LATENTS_STAGE / LATENT_STATS


def load_latent_stats(workdir: epath.PathLike) -> dict[str, np.ndarray]:
  """Per-channel `{"mean", "std"}` (float32 `[c]`) of the sampled latents."""
  path = latent_stats_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: run the `latents` stage first.")
  stats = json.loads(path.read_text())
  return {k: np.asarray(stats[k], np.float32) for k in ("mean", "std")}
