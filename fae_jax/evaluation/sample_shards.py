"""Preemption-safe sharded outputs of long evaluation passes (50K samples over many hosts).

A pass over `num_items` items (generated samples, held-out images) is cut into shards of
`shard_size` consecutive items: shard `j` covers `[j * shard_size, min((j + 1) * shard_size,
num_items))` and is the file `<directory>/samples-<j>.npz`. Shard `j` belongs to process
`j % process_count`; each process makes only its own shards, each written atomically
(`multihost.write_bytes_atomic`: temporary file then rename on local disk, one object write on
`gs://`), so a shard file is either absent or complete. A restart (any process count) makes
exactly the shards that are missing, so no item is produced twice or lost, and the result
does not depend on where the pass was interrupted as long as `make_shard(j, ...)` is a
deterministic function of `j` (callers derive their random keys from `j`).

Every shard holds an int64 `index` array `[n_j]`: the items it covers, strictly increasing in
`[start, stop)` (a held-out shard may skip undecodable images; a sample shard covers its range
exactly). `read_shards` checks that the indices of all shards, concatenated, are strictly
increasing, so a stale shard from another plan is refused rather than mixed in.

`plan.json` (written by `check_plan`) records what the shards were made with (sample count,
shard size, sampler setting, ...); a rerun with a different plan is refused with the fix
(delete the directory), never silently mixed.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from fae_jax import faults, multihost

INDEX_KEY = "index"
PLAN_NAME = "plan.json"


def num_shards(num_items: int, shard_size: int) -> int:
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
  return -(-int(num_items) // int(shard_size))


def shard_range(j: int, num_items: int, shard_size: int) -> tuple[int, int]:
  """`[start, stop)` of shard `j`."""
  return j * shard_size, min((j + 1) * shard_size, num_items)


def shard_path(directory: str | os.PathLike, j: int) -> epath.Path:
  return epath.Path(directory) / f"samples-{j:05d}.npz"


def process_shards(
  num_items: int, shard_size: int, process_index: int, process_count: int
) -> list[int]:
  """The shards process `process_index` makes (round robin)."""
  return [j for j in range(num_shards(num_items, shard_size)) if j % process_count == process_index]


def write_shard(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
  """One `.npz` written atomically (absent or complete, local disk and `gs://`)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  multihost.write_bytes_atomic(path, buf.getvalue())


def read_shard(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
    names = data.files if keys is None else keys
    missing = [k for k in names if k not in data.files]
    if missing:
      raise KeyError(f"{path} lacks {missing} (it has {data.files}); delete it to remake it.")
    return {k: data[k] for k in names}


def _check_index(index: np.ndarray, start: int, stop: int, what: str) -> None:
  index = np.asarray(index)
  if index.ndim != 1 or (len(index) and (index[0] < start or index[-1] >= stop)):
    raise ValueError(f"{what}: index {index[:3]}... lies outside its range [{start}, {stop}).")
  if len(index) > 1 and not (np.diff(index) > 0).all():
    raise ValueError(f"{what}: index is not strictly increasing.")


def check_plan(directory: str | os.PathLike, plan: dict[str, Any]) -> None:
  """Records `plan` in `<directory>/plan.json`, or refuses a directory made with another plan.

  Collective: every process calls it; process 0 decides and writes, then all pass a barrier.
  """
  directory = epath.Path(directory)
  plan = json.loads(json.dumps(plan))  # the JSON form, as it is compared after a restart

  def decide() -> str | None:
    path = directory / PLAN_NAME
    if not path.exists():
      directory.mkdir(parents=True, exist_ok=True)
      multihost.write_text_atomic(path, json.dumps(plan, indent=2, sort_keys=True) + "\n")
      return None
    old = json.loads(path.read_text())
    if old != plan:
      changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      return (
        f"{directory} holds shards made with another plan (differs in {changed}: {old} vs "
        f"{plan}); delete {directory} to make them again with the current config."
      )
    return None

  error = multihost.decide_once(f"shard-plan:{directory}", decide)
  if error:
    raise ValueError(error)
  multihost.barrier(f"shard-plan-done:{directory}")


def fill_shards(
  directory: str | os.PathLike,
  num_items: int,
  shard_size: int,
  make_shard: Callable[[int, int, int], dict[str, np.ndarray]],
  *,
  name: str,
  process_index: int | None = None,
  process_count: int | None = None,
) -> int:
  """Makes this process's missing shards; returns how many it made.

  Args:
    directory: where the shards go.
    num_items, shard_size: the plan (see the module docstring).
    make_shard: `(j, start, stop) -> {name: array}` with an `index` array (see the module
      docstring); must be deterministic in `j`.
    name: for the throughput / ETA logs.
    process_index, process_count: default `jax.process_index()` / `jax.process_count()`.

  Not collective: processes work at their own pace; call `multihost.barrier` before reading
  other processes' shards.
  """
  import jax

  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  mine = process_shards(num_items, shard_size, pi, pc)
  todo = [j for j in mine if not shard_path(directory, j).exists()]
  total = num_shards(num_items, shard_size)
  if len(todo) < len(mine):
    logging.info(
      "%s: %d of this process's %d shards already written; resuming.",
      name,
      len(mine) - len(todo),
      len(mine),
    )
  t0, items = time.time(), 0
  for done, j in enumerate(todo, 1):
    start, stop = shard_range(j, num_items, shard_size)
    arrays = make_shard(j, start, stop)
    if INDEX_KEY not in arrays:
      raise KeyError(f"{name}: make_shard({j}) returned no '{INDEX_KEY}' array.")
    _check_index(arrays[INDEX_KEY], start, stop, f"{name} shard {j}")
    write_shard(shard_path(directory, j), arrays)
    faults.point("evaluate:shard_done", shard_path(directory, j))
    items += stop - start
    elapsed = time.time() - t0
    rate = items / max(elapsed, 1e-9)
    remaining = sum(min((k + 1) * shard_size, num_items) - k * shard_size for k in todo[done:])
    logging.info(
      "%s: shard %d/%d written (process %d: %d/%d to do); %.1f items/s, ETA %.0f s",
      name,
      j + 1,
      total,
      pi,
      done,
      len(todo),
      rate,
      remaining / rate if rate > 0 else float("nan"),
    )
  return len(todo)


def read_shards(
  directory: str | os.PathLike, num_items: int, shard_size: int, keys: Sequence[str]
) -> dict[str, np.ndarray]:
  """Every shard's `keys` (and `index`), concatenated in shard order.

  Raises:
    FileNotFoundError: a shard is missing (names it).
    ValueError: the indices overlap or leave their shard's range (a stale shard).
  """
  keys = list(dict.fromkeys([INDEX_KEY, *keys]))
  parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for j in range(num_shards(num_items, shard_size)):
    path = shard_path(directory, j)
    if not path.exists():
      raise FileNotFoundError(
        f"Shard {path} is missing: the pass over {directory} did not finish (rerun the stage)."
      )
    shard = read_shard(path, keys)
    _check_index(shard[INDEX_KEY], *shard_range(j, num_items, shard_size), str(path))
    for k in keys:
      parts[k].append(shard[k])
  out = {k: np.concatenate(v) for k, v in parts.items()}
  _check_index(out[INDEX_KEY], 0, num_items, str(directory))
  return out


def iter_shards(directory: str | os.PathLike, num_items: int, shard_size: int, keys: Sequence[str]):
  """Yields each shard's `keys` in order (one shard in memory at a time)."""
  for j in range(num_shards(num_items, shard_size)):
    yield read_shard(shard_path(directory, j), keys)
