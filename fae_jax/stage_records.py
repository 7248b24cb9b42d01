"""Per-stage config records: a rerun with a different config stops instead of mixing outputs.

When a stage completes, `main` writes `<its output dir>/stage_config.json`: the config fields
that shaped its outputs, its own and those of every stage upstream of it (transitively), as
`{"stage": ..., "fields": {"fae.model.latent_dim": 32, ...}}`. Before the next run of the same
workdir does anything, `check` compares each record with the new config. A difference stops the
run, naming each field (old -> new) and the fix: a new `--workdir`, or `--redo=<stage>`, which
deletes the outputs of that stage and of everything downstream of it in this workdir (only once
the check has passed, on process 0 while the others wait) so they are made again.

Which fields count (the rule):
  * a stage's own subtrees (`OWN`) plus those of the stages it depends on (`depends_on`,
    transitively): `convert` the encoder's identity, `encode` the encoder's settings, `data.*` and
    `encode.*`, every trained stage `seed` and its own subtree, `evaluate` its subtree plus
    `pixel` and the generators it evaluates;
  * minus what does not change results: logging, evaluation and checkpoint cadence, kept
    checkpoints, profiling, data-loading parallelism, FSDP placement, rematerialisation, the
    encode batch size (`NOT_RESULTS`, `NOT_RESULT_KEYS`); and minus `encoder.source`, a path
    (`convert` compares the file's content hash itself; a moved file is the same encoder).
  * `mesh`, `stages`, `name` and `upstream_workdir` are in no subtree: they never count.
  * A field only one side has (a field added to or removed from the code since) is not compared.

Records are checked where this run reads or writes them: the own workdir, and for `convert` and
`encode` the upstream workdir only when this run runs them. A stage whose output directory exists
without a record (a workdir from before records) is accepted with a warning. A stage that
stopped before completing has no record; its own checks cover a resume (the checkpoint's shapes,
the cache's metadata).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from fae_jax import multihost, report
from fae_jax.fileio import write_json_atomic

RECORD = "stage_config.json"
# Pipeline order; `OUTPUTS`: each stage's output directory (relative to its root).
OUTPUTS = {
  "convert": "encoder",
  "encode": "features",
  "fae": "fae",
  "pixel": "pixel",
  "latents": "latents",
  "diffusion": "diffusion",
  "flow": "flow",
  "evaluate": "eval",
}
# Stages whose outputs live in `config.upstream_workdir` when it is set (StageContext.upstream).
IN_UPSTREAM = ("convert", "encode")
OWN = {
  "convert": ("encoder.variant", "encoder.num_registers"),
  "encode": ("encoder", "data", "encode"),
  "fae": ("seed", "fae"),
  "pixel": ("seed", "pixel"),
  "latents": ("seed", "latents"),
  "diffusion": ("seed", "diffusion"),
  "flow": ("seed", "flow"),
  "evaluate": ("seed", "evaluate"),
}
NOT_RESULTS = frozenset(
  {
    "log_every",
    "log_every_seconds",
    "eval_every",
    "checkpoint_every",
    "keep",
    "milestones",
    "async_checkpointing",
    "profile_steps",
    "num_workers",
    "read_threads",
    "prefetch_buffer_size",
    "fsdp_rules",
    "fsdp_min_size",
    "remat",
  }
)
NOT_RESULT_KEYS = frozenset({"encode.batch_size", "encoder.source"})


class ConfigChangedError(ValueError):
  """The workdir's completed stages ran with other values of fields that shape their outputs."""


def depends_on(stage: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The stages whose outputs `stage` reads (direct ones)."""
  if stage == "evaluate":
    return ("pixel", *(g for g in config.evaluate.generators if g in OUTPUTS))
  return {
    "convert": (),
    "encode": ("convert",),
    "fae": ("encode",),
    "pixel": ("fae",),
    "latents": ("fae",),
    "diffusion": ("latents",),
    "flow": ("latents",),
  }[stage]


def upstream_of(stage: str, config: ml_collections.ConfigDict) -> list[str]:
  """`stage` and every stage it depends on, transitively, in pipeline order."""
  seen, todo = set(), [stage]
  while todo:
    s = todo.pop()
    if s not in seen:
      seen.add(s)
      todo.extend(depends_on(s, config))
  return [s for s in OUTPUTS if s in seen]


def downstream_of(stage: str, config: ml_collections.ConfigDict) -> list[str]:
  """`stage` and every stage that depends on it, transitively, in pipeline order."""
  return [s for s in OUTPUTS if stage in upstream_of(s, config)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def fields(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
  """The dotted fields that shape `stage`'s outputs (the module doc's rule), JSON values."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  prefixes = [p for s in upstream_of(stage, config) for p in OWN[s]]
  return {
    key: value
    for key, value in sorted(flat.items())
    if any(key == p or key.startswith(p + ".") for p in prefixes)
    and key.rsplit(".", 1)[-1] not in NOT_RESULTS
    and key not in NOT_RESULT_KEYS
  }


def _root(stage: str, config, workdir: epath.Path) -> epath.Path:
  upstream = config.get("upstream_workdir") or ""
  return epath.Path(upstream) if upstream and stage in IN_UPSTREAM else workdir


def record_path(stage: str, config, workdir: epath.PathLike) -> epath.Path:
  return _root(stage, config, epath.Path(workdir)) / OUTPUTS[stage] / RECORD


def write(config: ml_collections.ConfigDict, workdir: epath.PathLike, stage: str) -> None:
  """Records the fields `stage` ran with (process 0; call once the stage is complete)."""
  if multihost.is_primary():
    record = {"stage": stage, "fields": fields(config, stage)}
    write_json_atomic(record_path(stage, config, workdir), record)


def _checked_stages(config, workdir: epath.Path) -> list[str]:
  """The stages this run runs, and their upstream, whose records belong to this run."""
  wanted = {u for s in config.stages if s in OUTPUTS for u in upstream_of(s, config)}
  return [
    s
    for s in OUTPUTS
    if s in wanted and (s in config.stages or _root(s, config, workdir) == workdir)
  ]


def differences(config, workdir: epath.PathLike, skip: Sequence[str] = ()) -> dict[str, list]:
  """`{stage: [(field, old, new), ...]}` of the recorded stages whose fields differ."""
  workdir = epath.Path(workdir)
  out = {}
  for stage in _checked_stages(config, workdir):
    if stage in skip:
      continue
    path = record_path(stage, config, workdir)
    if not path.exists():
      if path.parent.exists():
        logging.warning(
          "%s has no %s (a workdir from before config records): accepted unchecked; its "
          "outputs are reused as they are.",
          path.parent,
          RECORD,
        )
      continue
    old = json.loads(path.read_text())["fields"]
    new = fields(config, stage)
    diff = [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    if diff:
      out[stage] = diff
  return out


def _owns(stage: str, key: str) -> bool:
  return any(key == p or key.startswith(p + ".") for p in OWN[stage])


def _message(workdir, diffs: dict[str, list], config) -> str:
  lines = [f"{workdir} holds outputs made with another config; nothing was run:"]
  for stage, diff in diffs.items():
    where = record_path(stage, config, workdir)
    lines.append(f"  stage {stage} ({where}):")
    lines += [f"    {k}: {old!r} -> {new!r}" for k, old, new in diff]
  # The earliest stage whose own fields changed: redoing it redoes every stage listed.
  owned = [s for s in OUTPUTS if s in diffs and any(_owns(s, k) for k, _, _ in diffs[s])]
  first = (owned or list(diffs))[0]
  lines.append(
    f"Fix: a new --workdir, or --redo={first} to delete the outputs of {first} and of "
    f"everything downstream of it ({', '.join(downstream_of(first, config))}) in {workdir} "
    "and make them again; or go back to the old values."
  )
  return "\n".join(lines)


def _remove(directory: epath.Path) -> None:
  """Deletes a stage's output directory; locally renamed aside first, so a crash mid-delete
  leaves the stage absent (to be redone), not half there."""
  if not directory.exists():
    return
  if multihost.is_object_store(os.fspath(directory)):
    directory.rmtree()
    return
  aside = directory.parent / f".{directory.name}.redo-{os.getpid()}"
  directory.rename(aside)
  aside.rmtree()


def check(config: ml_collections.ConfigDict, workdir: epath.PathLike, redo: str = "") -> None:
  """Stops the run when a completed stage's record differs from `config` (see the module doc).

  With `redo`, that stage and its downstream stages are exempt, and once every other record
  agrees their outputs in `workdir` are deleted (process 0; the others wait at a barrier).
  Collective: every process calls it at the same point.
  """
  workdir = epath.Path(workdir)
  if redo:
    if redo not in OUTPUTS:
      raise ValueError(f"--redo={redo}: not a stage; choose one of {list(OUTPUTS)}.")
    if redo not in config.stages:
      raise ValueError(
        f"--redo={redo}: config.stages {list(config.stages)} does not run {redo}, so its "
        "outputs would not be made again; add it to config.stages."
      )
    if _root(redo, config, workdir) != workdir:
      raise ValueError(
        f"--redo={redo}: its outputs live in config.upstream_workdir="
        f"{config.upstream_workdir}, shared with other runs; redo it there."
      )
  redone = downstream_of(redo, config) if redo else []

  def decide():
    diffs = differences(config, workdir, skip=redone)
    return _message(workdir, diffs, config) if diffs else ""

  problem = multihost.decide_once(f"stage-records:{workdir}", decide)
  if problem:
    raise ConfigChangedError(problem)
  if not redone:
    return
  if multihost.is_primary():
    for stage in reversed(redone):  # downstream first: a crash leaves upstream records intact
      directory = _root(stage, config, workdir) / OUTPUTS[stage]
      if directory.exists():
        logging.warning("--redo=%s: deleting %s (stage %s).", redo, directory, stage)
      _remove(directory)
    rep = report.read_report(workdir)
    if rep:
      for stage in redone:
        rep.pop(stage, None)
        rep.get("stage_seconds", {}).pop(stage, None)
      write_json_atomic(workdir / report.REPORT_NAME, rep)
  multihost.barrier(f"redo-done:{workdir}")
