"""Checkpoints of a training stage: Orbax `CheckpointManager` with three items.

Items of each step directory `<stage>/checkpoints/<step>/`:
  state: the `TrainState` (Orbax StandardSave/StandardRestore; sharded arrays are written and read
    shard by shard, so a restore into sharded abstract targets never gathers a parameter).
  data: the grain iterator position (grain's own Orbax handler, one JSON per process).
  config: the stage's configuration as JSON, for humans and for `export`.

Policy: saves are asynchronous (the device-to-host copy blocks, the write does not) every
`checkpoint_every` steps and at each milestone; the newest `keep` checkpoints are kept plus every
milestone forever. The train loop adds a forced save at the last step and on preemption.

Preemption: on one process, `PreemptionFlag` turns SIGTERM into a flag the loop reads at the
next step boundary. With several processes the hosts must agree on the step, so the loop instead
asks `reached_preemption(step)`, which is JAX's preemption sync point (the distributed runtime
catches SIGTERM itself when `jax.distributed.initialize()` runs with the preemption service on).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from fae_jax import sharding, storage_errors

ITEMS = ("state", "data", "config")
_policies = ocp.checkpoint_managers


def tree_names(tree: Any) -> dict[str, Any]:
  """`{"params.a.kernel": leaf}`: leaves by dotted path (Orbax's parameter naming)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(sharding.key_name(k) for k in path): leaf for path, leaf in flat}


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s carrying `shardings` (restore targets; nothing is allocated)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def check_compatible(saved: Mapping[str, Any], target: Mapping[str, Any], where: str) -> None:
  """Raises a ValueError naming every parameter whose shape or presence differs.

  Args:
    saved: dotted name -> object with `.shape` (Orbax `ArrayMetadata`), from the checkpoint.
    target: dotted name -> `jax.ShapeDtypeStruct` the run expects.
    where: the checkpoint directory, for the message.
  """
  problems = []
  for name, want in target.items():
    if name not in saved:
      problems.append(f"  {name}: expected {tuple(want.shape)}, missing in the checkpoint")
      continue
    have = tuple(saved[name].shape)
    if have != tuple(want.shape):
      problems.append(f"  {name}: checkpoint has shape {have}, the model expects {want.shape}")
  for name in saved:
    if name not in target:
      problems.append(f"  {name}: in the checkpoint ({tuple(saved[name].shape)}), not in the model")
  if problems:
    raise ValueError(
      f"Checkpoint {where} does not match the model/optimizer being trained:\n"
      + "\n".join(problems[:50])
      + ("\n  ..." if len(problems) > 50 else "")
      + "\nIt was written by a run with another model/optimizer config. Fix: go back to that "
      "config, use a fresh --workdir, or rerun with --redo=<this stage> (fae_jax.main) to train "
      "the stage again from scratch; the checkpoint is left as it is until then."
    )


def config_to_json(config: Any) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def absolute_path(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute against the working directory; URLs (gs://...) pass unchanged.

  Orbax refuses relative checkpoint paths, and `make demo` passes a relative workdir.
  """
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


class Checkpointer:
  """A stage's checkpoint directory (see the module doc)."""

  def __init__(
    self,
    directory: str | epath.PathLike,
    *,
    checkpoint_every: int,
    keep: int | None = 3,
    milestones: Sequence[int] = (),
    async_save: bool = True,
  ):
    self.directory = absolute_path(directory)
    save_policies = [_policies.PreemptionCheckpointingPolicy()]
    if checkpoint_every and checkpoint_every > 0:
      save_policies.append(_policies.FixedIntervalPolicy(int(checkpoint_every)))
    if milestones:
      save_policies.append(_policies.SpecificStepsPolicy(tuple(int(s) for s in milestones)))
    keep_policies = [_policies.LatestN(int(keep) if keep else None)]
    if milestones:
      keep_policies.append(_policies.CustomSteps([int(s) for s in milestones]))
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        save_decision_policy=_policies.AnySavePolicy(save_policies),
        preservation_policy=_policies.AnyPreservationPolicy(keep_policies),
        enable_async_checkpointing=async_save,
        create=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(
    self, step: int, state: Any, data_iter: Any, config: Any, *, force: bool = False
  ) -> bool:
    """Starts an (async) save when the policy or `force` asks; returns whether one started.

    The data iterator's position is written before this returns, so the caller may advance it.
    """
    if step in self._manager.all_steps():
      return False
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(config_to_json(config)),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    with self._storage("checkpoint save"):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, Any]:
    """Restores `state` (and the iterator's position when `data_iter` is given) at `step`.

    Args:
      step: a step listed by `all_steps()`.
      abstract_state: the state as `jax.ShapeDtypeStruct`s with the target shardings; arrays are
        read straight into those shardings.
      data_iter: a fresh grain iterator whose state is set in place, or None.

    Returns:
      `(state, data_iter)`.
    """
    where = str(self.directory / str(step))
    saved = self._manager.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
    check_compatible(tree_names(saved_tree), tree_names(abstract_state), where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], (restored["data"] if data_iter is not None else None)

  def restore_config(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def _storage(self, what: str):
    """Full disk / read-only storage -> `StorageError` (a save runs in the background, so its
    failure surfaces at the next save, wait or close)."""
    return storage_errors.writing(
      what,
      self.directory,
      kept=f"The checkpoints already complete in {self.directory} are intact (a save is "
      "visible only once whole).",
    )

  def wait(self) -> None:
    with self._storage("checkpoint save"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      with self._storage("checkpoint save"):
        self._manager.wait_until_finished()
    finally:
      self._manager.close()


class PreemptionFlag:
  """Context manager: while active, SIGTERM sets `self.requested` instead of killing us.

  Only installed in the main thread of a single-process run (see the module doc); elsewhere it is
  inert and `requested` stays False. The previous handler comes back on exit.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False

  def _handle(self, signum, frame) -> None:
    del frame
    if not self.requested:
      logging.warning("Received signal %d: saving a checkpoint at the next step.", signum)
    self.requested = True

  def __enter__(self) -> PreemptionFlag:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
