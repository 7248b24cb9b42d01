"""Kill anywhere, resume to the same result: the harness of tests/test_kill_resume.py.

Runs the tiny demo pipeline (`configs/demo.py:random_encoder,tiny`, one process, 8 CPU devices)
once straight through, then, for each kill point, again: killed at that point (`fae_jax.faults`,
`FAE_JAX_KILL_AT`, reached deterministically: no sleeps) with SIGKILL or SIGTERM, then restarted
without the kill until it finishes. The finished run must equal the straight run: every array of
every export, every cache file and every number of `report.json` (timings and paths left out).

A point in stage S starts from a workdir holding the straight run's outputs of the stages before
S (and their report sections) and runs the pipeline through S (`config.stages` cut after S), so
each point pays only for S: the restarted run skips the earlier stages as complete, exactly as
it would after a kill in S, and the later stages are deterministic functions of their inputs,
which are S's outputs, compared bit for bit (`--through-end` runs every point to the end).

  python tests/kill_resume.py [--points a,b] [--out table.md]   # every point, a markdown table

Each run is `python -m fae_jax.main` in a subprocess (the kill takes the whole process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"{ROOT}/configs/demo.py:random_encoder,tiny"
PIPELINE = ("convert", "encode", "fae", "pixel", "latents", "diffusion", "flow", "evaluate")
# What each stage writes into the workdir (seeded from the straight run for later points).
STAGE_OUTPUTS = {
  "convert": ("encoder",),
  "encode": ("features",),
  "fae": ("fae",),
  "pixel": ("pixel",),
  "latents": ("latents",),
  "diffusion": ("diffusion",),
  "flow": ("flow",),
  "evaluate": ("eval",),
}
EXPORTS = (
  "encoder",
  "fae/export",
  "pixel/export",
  "pixel/export_noisy",
  "diffusion/export",
  "flow/export",
)
CACHES = ("features/train", "features/eval", "latents/train")
# Report sections the `evaluate` stage writes besides its own.
EVALUATE_SECTIONS = {"real", "recon", "diffusion", "flow"}
MAX_RESTARTS = 3
TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Point:
  """A kill point: its id, the stage it is in, and `FAE_JAX_KILL_AT` without the signal."""

  id: str
  stage: str
  spec: str
  what: str


POINTS = (
  Point(
    "convert-export",
    "convert",
    "export:before_commit,at=encoder",
    "convert: the encoder's params written, its commit marker not",
  ),
  Point(
    "encode-shard-tmp",
    "encode",
    "cache:shard_before_rename,at=features/train/shard-00001-of-00003.array_record",
    "encode: inside a shard write (temp file written, not renamed)",
  ),
  Point(
    "encode-between-shards",
    "encode",
    "cache:shard_done,at=features/train/shard-00000-of-00003.array_record",
    "encode: between two shard writes",
  ),
  Point(
    "encode-manifest",
    "encode",
    "atomic_write:before_replace,at=features/train/manifest.json",
    "encode: every shard written, the manifest not renamed",
  ),
  Point("fae-mid-train", "fae", "train:fae:step,at=15", "fae: after step 15 of 20"),
  Point(
    "fae-async-save",
    "fae",
    "train:fae:saving,at=10",
    "fae: asynchronous checkpoint save of step 10 started, not finished",
  ),
  Point(
    "fae-export",
    "fae",
    "export:before_commit,at=fae/export",
    "fae: export params written, model.json not",
  ),
  Point(
    "pixel-between-phases",
    "pixel",
    "pixel:between_phases,at=noisy",
    "pixel: phase noisy trained and exported, finetune not begun",
  ),
  Point(
    "pixel-export",
    "pixel",
    "export:before_commit,at=pixel/export",
    "pixel: the final decoder's params written, model.json not",
  ),
  Point(
    "latents-shard-tmp",
    "latents",
    "cache:shard_before_rename,at=latents/train/shard-00001-of-00003.array_record",
    "latents: inside a shard write",
  ),
  Point(
    "latents-stats",
    "latents",
    "atomic_write:before_replace,at=latents/stats.json",
    "latents: cache complete, statistics file not renamed",
  ),
  Point("diffusion-mid-train", "diffusion", "train:diffusion:step,at=3", "diffusion: after step 3"),
  Point(
    "diffusion-async-save",
    "diffusion",
    "train:diffusion:saving,at=2",
    "diffusion: checkpoint save of step 2 started",
  ),
  Point("flow-mid-train", "flow", "train:flow:step,at=3", "flow: after step 3 of 4"),
  Point(
    "flow-export",
    "flow",
    "export:before_commit,at=flow/export",
    "flow: export params written, model.json not",
  ),
  Point(
    "evaluate-sample-shard",
    "evaluate",
    "atomic_write:before_replace,at=samples-00000.npz,hit=2",
    "evaluate: mid-sampling (a sample shard written, not renamed)",
  ),
  Point(
    "evaluate-metrics",
    "evaluate",
    "atomic_write:before_replace,at=eval/metrics.json",
    "evaluate: every pass done, metrics.json not renamed",
  ),
  Point(
    "report-write",
    "evaluate",
    "atomic_write:before_replace,at=report.json",
    "report.json written to its temp file, not renamed (after evaluate)",
  ),
  Point(
    "report-write-encode",
    "encode",
    "atomic_write:before_replace,at=report.json",
    "report.json after encode (the caches complete, their report section not written)",
  ),
)
POINTS_BY_ID = {p.id: p for p in POINTS}
SIGNALS = ("KILL", "TERM")


@dataclasses.dataclass
class Result:
  point: str
  signal: str
  killed_rc: int  # the killed run's exit status (-9 SIGKILL, -15 SIGTERM, 0 preempted)
  restarts: int  # runs after the killed one until the pipeline finished
  resumed: bool  # the restarted runs finished the pipeline
  identical: bool  # exports, caches and report equal to the straight run
  max_abs_diff: float  # over every export array and report number
  differences: list[str]
  seconds: float

  def row(self) -> str:
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    p = POINTS_BY_ID[self.point]
    return (
      f"| `{self.point}` | {p.what} | SIG{self.signal} | {self.killed_rc} | {self.restarts} | "
      f"{yes(self.resumed)} | {yes(self.identical)} | {self.max_abs_diff:.3g} |"
    )


TABLE_HEADER = (
  "| point | where | signal | exit | restarts | resumed | identical | max abs diff |\n"
  "|---|---|---|---|---|---|---|---|"
)


def _env(kill: str | None) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env.pop("FAE_JAX_KILL_AT", None)
  if kill:
    env["FAE_JAX_KILL_AT"] = kill
  return env


def run_pipeline(workdir: pathlib.Path, log: pathlib.Path, stages=PIPELINE, kill=None) -> int:
  """One `python -m fae_jax.main` run; returns its exit status (negative: killed by a signal)."""
  command = [sys.executable, "-m", "fae_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
  if tuple(stages) != PIPELINE:
    command.append(f"--config.stages=({','.join(repr(s) for s in stages)},)")
  with open(log, "w") as f:
    proc = subprocess.run(
      command,
      env=_env(kill),
      stdout=f,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      timeout=TIMEOUT_S,
      cwd=ROOT,
    )
  return proc.returncode


def finished(workdir: pathlib.Path, stages) -> bool:
  """Every stage's section and time are in report.json (main writes them after each stage)."""
  path = workdir / "report.json"
  if not path.exists():
    return False
  report = json.loads(path.read_text())
  return all(s in report.get("stage_seconds", {}) for s in stages)


def straight_run(workdir: pathlib.Path, stages=PIPELINE) -> pathlib.Path:
  """The reference: the pipeline run once, never killed (reused when `ok` exists)."""
  if (workdir / "ok").exists():
    return workdir / "run"
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  rc = run_pipeline(workdir / "run", workdir / "straight.log", stages)
  if rc or not finished(workdir / "run", stages):
    tail = (workdir / "straight.log").read_text()[-6000:]
    raise RuntimeError(f"the straight run failed (exit {rc}):\n{tail}")
  (workdir / "ok").write_text("")
  return workdir / "run"


def seed_workdir(straight: pathlib.Path, workdir: pathlib.Path, stage: str, stages) -> None:
  """`workdir` with the straight run's outputs of the stages before `stage`, and their report."""
  workdir.mkdir(parents=True)
  before = [s for s in stages[: stages.index(stage)]]
  for s in before:
    for name in STAGE_OUTPUTS[s]:
      if (straight / name).exists():
        shutil.copytree(straight / name, workdir / name)
  if before:
    report = json.loads((straight / "report.json").read_text())
    later = _evaluate_metrics(straight)  # evaluate's keys in the generators' sections
    kept = {
      s: {k: v for k, v in report[s].items() if k not in later.get(s, {})}
      for s in before
      if s in report
    }
    kept["stage_seconds"] = {s: report["stage_seconds"][s] for s in before}
    (workdir / "report.json").write_text(json.dumps(kept, indent=2))


def run_point(
  point: Point, signal: str, workdir: pathlib.Path, straight: pathlib.Path, through_end=False
) -> Result:
  """Kills the pipeline at `point` with SIG`signal`, restarts it until it finishes, compares."""
  t0 = time.time()
  stages = PIPELINE if through_end else PIPELINE[: PIPELINE.index(point.stage) + 1]
  shutil.rmtree(workdir, ignore_errors=True)
  seed_workdir(straight, workdir / "run", point.stage, stages)
  run = workdir / "run"
  kill = f"{point.spec},signal={signal}"
  rc = run_pipeline(run, workdir / "killed.log", stages, kill)
  log = (workdir / "killed.log").read_text()
  if "killing process 0 now" not in log:
    raise AssertionError(
      f"{point.id}: the kill point was never reached (exit {rc}):\n{log[-4000:]}"
    )
  restarts, rc2 = 0, None
  while not finished(run, stages) and restarts < MAX_RESTARTS:
    restarts += 1
    rc2 = run_pipeline(run, workdir / f"restart{restarts}.log", stages)
    if rc2 != 0:
      break
  resumed = rc2 == 0 and finished(run, stages)
  differences, max_diff = ["not resumed"], float("inf")
  if resumed:
    differences, max_diff = compare(straight, run, stages)
  return Result(
    point.id,
    signal,
    rc,
    restarts,
    resumed,
    resumed and not differences,
    max_diff,
    differences,
    round(time.time() - t0, 1),
  )


# --- comparisons ---------------------------------------------------------------------------------


def _is_timing_or_path(key: str, value) -> bool:
  return (
    "seconds" in key
    or key.endswith(("per_second", "per_sec"))
    or (isinstance(value, str) and value.startswith("/"))
  )


def report_numbers(tree, prefix="") -> dict:
  """`{dotted key: value}` of every number and string of a report (timings and paths left out)."""
  out = {}
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    key = f"{prefix}.{k}" if prefix else str(k)
    if _is_timing_or_path(str(k), v):
      continue
    if isinstance(v, dict | list):
      out.update(report_numbers(v, key))
    else:
      out[key] = v
  return out


def _load_export(directory: pathlib.Path) -> dict:
  import jax

  from fae_jax import params_store

  params = params_store.load_params(directory)
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)
  }


def _evaluate_metrics(workdir: pathlib.Path) -> dict:
  path = workdir / STAGE_OUTPUTS["evaluate"][0] / "metrics.json"
  return json.loads(path.read_text()) if path.exists() else {}


def _stage_of(path: str) -> str:
  top = path.split("/")[0]
  return next(s for s, outputs in STAGE_OUTPUTS.items() if top in outputs)


def compare(a: pathlib.Path, b: pathlib.Path, stages=PIPELINE) -> tuple[list[str], float]:
  """`(differences, max abs diff)` between two workdirs: the exports, caches and report sections
  of `stages` (`a` may hold more: the straight run)."""
  diffs, max_diff = [], 0.0
  for export in EXPORTS:
    if not (a / export).exists() or _stage_of(export) not in stages:
      continue
    if not (b / export).exists():
      diffs.append(f"{export}: missing")
      continue
    xa, xb = _load_export(a / export), _load_export(b / export)
    if sorted(xa) != sorted(xb):
      diffs.append(f"{export}: other parameters")
      continue
    for name, x in xa.items():
      y = xb[name]
      if x.shape != y.shape or x.dtype != y.dtype:
        diffs.append(f"{export}{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        continue
      d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
      max_diff = max(max_diff, d)
      if not np.array_equal(x, y):
        diffs.append(f"{export}{name}: max abs diff {d:.3g}")
  for cache in CACHES:
    if not (a / cache).exists() or _stage_of(cache) not in stages:
      continue
    names = sorted(p.name for p in (a / cache).iterdir() if not p.name.startswith("."))
    names_b = sorted(p.name for p in (b / cache).iterdir() if not p.name.startswith("."))
    if names != names_b:
      diffs.append(f"{cache}: files {names} vs {names_b}")
      continue
    for name in names:
      if (a / cache / name).read_bytes() != (b / cache / name).read_bytes():
        diffs.append(f"{cache}/{name}: other bytes")
  sections = set(stages) | (EVALUATE_SECTIONS if "evaluate" in stages else set())
  later = set() if "evaluate" in stages else set(report_numbers(_evaluate_metrics(a)))
  ra, rb = (
    {
      k: v
      for k, v in report_numbers(json.loads((w / "report.json").read_text())).items()
      if k.split(".")[0] in sections and k not in later
    }
    for w in (a, b)
  )
  if sorted(ra) != sorted(rb):
    diffs.append(
      f"report keys: only straight {sorted(set(ra) - set(rb))}, only resumed {sorted(set(rb) - set(ra))}"
    )
  for key in sorted(set(ra) & set(rb)):
    va, vb = ra[key], rb[key]
    if isinstance(va, int | float) and isinstance(vb, int | float) and not isinstance(va, bool):
      max_diff = max(max_diff, abs(float(va) - float(vb)))
    if va != vb:
      diffs.append(f"report {key}: {va!r} vs {vb!r}")
  return diffs, max_diff


def table_from_logs(paths) -> str:
  """The markdown table of the results (JSON lines) in these logs, in point and signal order."""
  results = {}
  for path in paths:
    for line in pathlib.Path(path).read_text().splitlines():
      if line.startswith("{"):
        r = Result(**json.loads(line))
        results[(r.point, r.signal)] = r
  rows = [results[(p.id, s)].row() for p in POINTS for s in SIGNALS if (p.id, s) in results]
  missing = [f"{p.id} SIG{s}" for p in POINTS for s in SIGNALS if (p.id, s) not in results]
  table = "\n".join([TABLE_HEADER, *rows])
  return table + (f"\n\nNot run: {', '.join(missing)}." if missing else "")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/fae_jax_kill_resume")
  parser.add_argument("--points", default="", help="comma-separated point ids (default: all)")
  parser.add_argument("--signals", default="KILL,TERM")
  parser.add_argument("--out", default="", help="also write the markdown table here")
  parser.add_argument("--through-end", action="store_true", help="run every point to the end")
  parser.add_argument(
    "--table-from", nargs="*", default=None, help="only print the table of these runs' logs"
  )
  args = parser.parse_args()
  if args.table_from is not None:
    print(table_from_logs(args.table_from))
    return
  base = pathlib.Path(args.workdir)
  points = [POINTS_BY_ID[p] for p in args.points.split(",")] if args.points else list(POINTS)
  t0 = time.time()
  straight = straight_run(base / "straight")
  print(f"straight run: {straight} ({time.time() - t0:.0f} s)", flush=True)
  rows = []
  for point in points:
    for signal in args.signals.split(","):
      result = run_point(point, signal, base / f"{point.id}-{signal}", straight, args.through_end)
      print(json.dumps(dataclasses.asdict(result)), flush=True)
      rows.append(result.row())
      table = "\n".join([TABLE_HEADER, *rows]) + "\n"
      if args.out:
        pathlib.Path(args.out).write_text(table)
  print(table)


if __name__ == "__main__":
  main()
