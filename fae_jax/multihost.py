"""Every multi-host rule in one place: process start-up, decisions, barriers, gathers, commits.

Users run the same `python -m fae_jax.main` on every host of a pod. Each process runs every line
of a stage, so anything that differs between processes (a file that one host sees and another
does not yet, a value only one host computed) must go through here:

* `initialize(mode, ...)`: `jax.distributed.initialize` with the flags given and JAX's own
  cluster detection (Cloud TPU VM, GKE, SLURM, Open MPI, Kubernetes) for the rest.
* `is_primary()`: process 0 writes the single-writer files (report, stats, markers).
* `barrier(name)`: every process waits here until all have arrived.
* `decide_once(name, fn)`: process 0 computes a small JSON value, every process gets that value,
  so hosts cannot disagree (e.g. whether a stage is already complete).
* `gather(tree)`: a global (sharded) array as numpy on every host.
* `share_from_primary(name, fn)`: process 0 computes arrays (e.g. loads a checkpoint only it can
  read), every process gets them, leaf by leaf.
* `sum_over_processes(values)`: per-host counts summed over hosts (every host gets the sum).
* GCS-safe atomic writes. `rename` is not atomic on `gs://` (a copy then a delete) and
  `shutil.rmtree` does not work there, so nothing here renames a directory or uses `os`/`shutil`:
  - a file is written in one object write on object stores (atomic there) and to a temporary
    sibling then `replace`d on local disk (atomic there);
  - a directory is complete only when its commit marker exists (`is_committed`); the marker is
    written last, after a barrier, and removed first when a stale directory is cleared, so a
    reader that checks the marker never takes a half-written directory for a complete one.

The local rehearsal (`python -m fae_jax.multiprocess`) hands the coordinator address, process
count and process id to each process in `FAE_JAX_COORDINATOR_ADDRESS`, `FAE_JAX_NUM_PROCESSES`
and `FAE_JAX_PROCESS_ID`, which `initialize` reads when the flags are not given.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fae_jax import faults

ENV_COORDINATOR = "FAE_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FAE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FAE_JAX_PROCESS_ID"
COMMIT_MARKER = "COMMITTED"
# Object stores: one object write is atomic, rename is a copy plus a delete.
OBJECT_STORE_PREFIXES = ("gs://", "s3://", "az://")

# What `initialize` did, for the device table (`describe()`).
_STATE: dict[str, Any] = {"distributed": False, "how": "not initialised (one process)"}


# --- Process start-up ---------------------------------------------------------------------------


def detect_cluster() -> str | None:
  """The name of the cluster JAX's auto-detection finds here (e.g. 'GceTpuCluster'), or None.

  Uses the same `ClusterEnv` registry `jax.distributed.initialize()` consults, so `auto`
  initialises exactly where a bare `jax.distributed.initialize()` would find its parameters.
  """
  from jax._src import clusters

  for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001 (JAX has no public API for it)
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception as e:  # noqa: BLE001 (a probe that fails means "not this cluster")
      logging.warning("Cluster probe %s failed: %s", env.__name__, e)
  return None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> dict[str, Any]:
  """Starts multi-process JAX if wanted; call before anything touches a JAX backend.

  Args:
    mode: 'off' never initialises; 'on' always does (what is not given comes from JAX's cluster
      detection, which fails clearly when there is none); 'auto' does when any parameter is
      given (flag or `FAE_JAX_*` variable) or when a cluster is detected.
    coordinator_address, num_processes, process_id: passed on when given (else `FAE_JAX_*`).

  Returns the summary also shown by `describe()`.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}: use 'auto', 'on' or 'off'.")
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = {
    k: v
    for k, v in dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    ).items()
    if v is not None
  }
  cluster = None if mode == "off" or given else detect_cluster()
  if mode == "off" or (mode == "auto" and not given and cluster is None):
    _STATE.update(distributed=False, how=f"not initialised (--distributed={mode})")
    return dict(_STATE)
  # Several CPU processes need a cross-process collective implementation; gloo ships with jaxlib.
  # Only the CPU client reads it, so setting it is harmless on TPU/GPU.
  if mode == "on" and not given and cluster is None:
    raise ValueError(
      "--distributed=on: no cluster detected (Cloud TPU VM, GKE, SLURM, Open MPI, Kubernetes) and "
      "none of --coordinator_address/--num_processes/--process_id given; give all three, or use "
      "--distributed=auto to run as one process."
    )
  if jax.config.jax_cpu_collectives_implementation not in ("mpi", "megascale"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**given)
  from jax._src import distributed as jax_distributed

  how = f"flags/env {sorted(given)}" if given else f"detected {cluster or 'by JAX'}"
  _STATE.update(
    distributed=True,
    how=how,
    coordinator=jax_distributed.global_state.coordinator_address,
  )
  return dict(_STATE)


def describe() -> str:
  """One line for the device table: process index/count, devices, coordinator, how started."""
  coordinator = _STATE.get("coordinator")
  return (
    f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local "
    f"/ {jax.device_count()} global devices ({jax.default_backend()}); distributed: "
    f"{_STATE['how']}" + (f", coordinator {coordinator}" if coordinator else "")
  )


# --- Decisions, barriers, gathers ---------------------------------------------------------------


def is_primary() -> bool:
  """Process 0: the single writer of files that exist once (reports, stats, commit markers)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits until all reach the barrier `name` (names must match across hosts)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"fae_jax:{name}")


def decide_once(name: str, fn: Callable[[], Any]) -> Any:
  """Process 0 evaluates `fn()` (a small JSON-able value); every process returns that value.

  `fn` runs on process 0 only, so it may read files that other hosts cannot see yet. Every
  process must call `decide_once` with the same `name` at the same point. When `fn` raises, the
  error reaches every process (process 0 re-raises it, the others raise `RuntimeError` with its
  message), so no host is left waiting for a decision.
  """
  if jax.process_count() == 1:
    return fn()
  error = None
  if is_primary():
    try:
      message = {"value": fn()}
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
      error, message = e, {"error": f"{type(e).__name__}: {e}"}
    payload = json.dumps(message).encode()
  else:
    payload = b""
  size = multihost_utils.broadcast_one_to_all(np.asarray(len(payload), np.int64))
  buf = np.zeros(int(size), np.uint8)
  if is_primary():
    buf[:] = np.frombuffer(payload, np.uint8)
  data = multihost_utils.broadcast_one_to_all(buf)
  message = json.loads(np.asarray(data, np.uint8).tobytes().decode())
  if error is not None:
    raise error
  if "error" in message:
    raise RuntimeError(f"Process 0 failed to decide {name!r}: {message['error']}")
  return message["value"]


def gather(tree: Any) -> Any:
  """The full value of every (global, possibly sharded) array of `tree`, as numpy on every host.

  One process: a device-to-host copy. Several: `process_allgather(tiled=True)`, a collective,
  so every process must call it. Host-local numpy values pass through unchanged.
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def share_from_primary(name: str, fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
  """Process 0 runs `fn() -> (small JSON value, pytree of numpy arrays)`; every process returns both.

  The tree's structure, shapes and dtypes travel with `decide_once`, then each leaf is broadcast
  on its own (`broadcast_one_to_all`), so at most one leaf is in flight: a multi-GB checkpoint
  never needs a second copy on a device. Collective. One process: `fn()` unchanged.
  """
  if jax.process_count() == 1:
    return fn()
  held = {}

  def describe_primary():
    value, tree = fn()
    leaves, treedef = jax.tree.flatten(tree)
    held["leaves"], held["treedef"] = [np.asarray(a) for a in leaves], treedef
    # The structure as a tree of None leaves: JSON keeps dict keys (str), lists and None.
    skeleton = jax.tree.unflatten(treedef, [None] * len(leaves))
    shapes = [[list(a.shape), str(a.dtype)] for a in held["leaves"]]
    return {"value": value, "skeleton": skeleton, "shapes": shapes}

  described = decide_once(f"share:{name}", describe_primary)
  if is_primary():
    leaves, treedef = held["leaves"], held["treedef"]
  else:
    leaves = [np.zeros(shape, dtype) for shape, dtype in described["shapes"]]
    treedef = jax.tree.structure(described["skeleton"], is_leaf=lambda x: x is None)
  shared = [np.asarray(multihost_utils.broadcast_one_to_all(a)) for a in leaves]
  return described["value"], jax.tree.unflatten(treedef, shared)


def sum_over_processes(values: Any) -> np.ndarray:
  """`values` (a number or an int/float vector, per host) summed over every host. Collective."""
  x = np.atleast_1d(np.asarray(values))
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).reshape(-1, *x.shape).sum(0)


# --- GCS-safe writes ----------------------------------------------------------------------------


def is_object_store(path: str | os.PathLike) -> bool:
  return str(path).startswith(OBJECT_STORE_PREFIXES)


def temp_path(path: str | os.PathLike) -> epath.Path:
  """The temporary sibling `<dir>/.<name>.tmp-<pid>` a local writer fills before replacing."""
  path = epath.Path(path)
  return path.parent / f".{path.name}.tmp-{os.getpid()}"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Readers see the old file or the whole new one, never part of it (local disk and gs://).

  One process writes a given file (callers guard with `is_primary()` where all hosts share it).
  """
  path = epath.Path(path)
  if is_object_store(path):
    path.write_bytes(data)  # one object upload: visible only once complete
    return
  tmp = temp_path(path)
  try:
    tmp.write_bytes(data)
  except BaseException:
    tmp.unlink(missing_ok=True)  # a full disk: give back what the partial file took
    raise
  faults.point("atomic_write:before_replace", path)
  tmp.replace(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode())


def is_committed(directory: str | os.PathLike, marker: str = COMMIT_MARKER) -> bool:
  """True when `directory` was completely written (its commit marker exists)."""
  return (epath.Path(directory) / marker).exists()


def remove_directory(directory: str | os.PathLike, marker: str = COMMIT_MARKER) -> None:
  """Deletes `directory` marker first, so a crash mid-delete leaves it uncommitted, not partial.

  Single-process; callers on several hosts run it on the primary between barriers.
  """
  directory = epath.Path(directory)
  if (directory / marker).exists():
    (directory / marker).unlink()
  if directory.exists():
    directory.rmtree()  # epath: works on gs:// (object by object; safe: the marker is gone)


@contextlib.contextmanager
def committed_directory(
  directory: str | os.PathLike, marker: str = COMMIT_MARKER, marker_text: str = ""
) -> Iterator[epath.Path]:
  """Collective: every process enters; they write into `directory`; the marker commits it.

  On entry a stale uncommitted directory (a crashed earlier attempt) is removed; a committed one
  raises `FileExistsError` on every process (the decision is process 0's). On a clean exit,
  after a barrier (every process has finished its part), process 0 writes `marker` with
  `marker_text`. An exception inside leaves the directory uncommitted.
  """
  directory = epath.Path(directory)
  state = decide_once(
    f"commit:{directory}",
    lambda: (
      "committed"
      if is_committed(directory, marker)
      else ("partial" if directory.exists() else "absent")
    ),
  )
  if state == "committed":
    raise FileExistsError(
      f"{directory} is already complete ({marker} exists); delete it to write it again."
    )
  if is_primary():
    if state == "partial":
      logging.warning("Removing %s: an earlier attempt did not finish it.", directory)
      remove_directory(directory, marker)
    directory.mkdir(parents=True, exist_ok=True)
  barrier(f"commit-begin:{directory}")
  yield directory
  faults.point("export:before_commit", directory)
  barrier(f"commit-written:{directory}")
  if is_primary():
    write_text_atomic(directory / marker, marker_text)
  barrier(f"commit-done:{directory}")
