"""Entry point: runs the stages listed in `config.stages`, skipping completed ones.

  python -m fae_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fae_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/fae \
      --config.encoder.source=/path/dinov2_vitg14_pretrain.pth

The config is locked: a misspelt `--config.x.y` fails with the list of valid keys.
"""

from __future__ import annotations

import json
import logging as logging_std
import os
import sys
import time

# Before jax initialises its backends.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":
  # On a CPU host: once, re-executed with huge pages for XLA's large host allocations
  # (fae_jax.host_memory), before any thread starts.
  from fae_jax import host_memory

  host_memory.reexec_with_huge_pages()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fae_jax import config_checks, fileio, host_memory, multihost, stage_records  # noqa: E402
from fae_jax import report as report_lib  # noqa: E402
from fae_jax.stages import STAGES, StageContext  # noqa: E402
from fae_jax.train.checkpoint import absolute_path  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed.initialize(): 'auto' when a cluster is detected (Cloud TPU VM, GKE, SLURM, "
  "Open MPI, Kubernetes) or a flag below is given; 'on' always; 'off' never.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_REDO = flags.DEFINE_string(
  "redo",
  "",
  "Redo this stage and everything downstream of it: their outputs in --workdir are deleted "
  "(after the config checks pass) and made again with this config (fae_jax.stage_records).",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax (several lines per save/restore); warnings still pass."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def log_devices() -> None:
  lines = [f"JAX {jax.__version__}: {multihost.describe()}"]
  for d in jax.devices():
    lines.append(f"  id={d.id:<4d} process={d.process_index:<3d} {d.device_kind}")
  logging.info("\n".join(lines))


def check_stages(stages) -> None:
  problems = config_checks.check_stage_names(stages, STAGES)
  if problems:
    raise app.UsageError(problems[0])


def _state(stage, ctx: StageContext) -> str:
  """'done', 'unreported' (complete outputs, no report entry) or 'todo'."""
  if not stage.is_complete(ctx):
    return "todo"
  recorded = report_lib.read_report(ctx.workdir).get("stage_seconds", {})
  return "done" if stage.NAME in recorded else "unreported"


def run_stages(config, workdir: epath.Path, redo: str = "") -> dict:
  """Runs `config.stages` in order; returns the final report.

  Before anything: the config's values (`config_checks`), then the workdir's per-stage config
  records (`stage_records`; `redo` names a stage to make again with its downstream ones).
  """
  # Every value wrong on its face fails here, before the workdir is touched.
  mesh = config_checks.check_config(config, STAGES)
  workdir = absolute_path(workdir)
  stage_records.check(config, workdir, redo)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("Mesh: %s", dict(mesh.shape))
  ctx = StageContext(config=config, workdir=workdir, mesh=mesh)
  if multihost.is_primary():
    fileio.write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
  for name in config.stages:
    stage = STAGES[name]
    # One decision for all hosts (they could see the files differently), then all follow.
    # Complete outputs whose report entry is missing (a run stopped between the two) run again:
    # the stage resumes from its outputs and recomputes its values.
    state = multihost.decide_once(f"complete:{name}", lambda stage=stage: _state(stage, ctx))
    if state == "done":
      logging.info("Stage %s: already complete in %s, skipped.", name, workdir)
      continue
    if state == "unreported":
      logging.warning("Stage %s: complete, but not in the report: recomputing its values.", name)
    logging.info("Stage %s: starting.", name)
    t0 = time.time()
    values = stage.run(ctx)
    seconds = time.time() - t0
    report_lib.update_report(workdir, name, values, seconds)
    stage_records.write(config, workdir, name)
    multihost.barrier(f"stage-done:{name}")  # the report and the stage's files are written
    logging.info("Stage %s: done in %.1f s: %s", name, seconds, json.dumps(values, default=str))
  return report_lib.read_report(workdir)


def main(argv):
  logging.info(host_memory.describe())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  multihost.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  log_devices()
  logging.info("Config:\n%s", config)
  workdir = epath.Path(_WORKDIR.value)
  report = run_stages(config, workdir, _REDO.value)
  if jax.process_index() == 0:
    print(f"\nOutputs in {workdir}:")
    for name in config.stages:
      if (workdir / name).exists():
        print(f"  {name:10s} {workdir / name}")
    print(f"  report     {workdir / report_lib.REPORT_NAME} (every number)")
    print("\nSummary:")
    print(report_lib.summary(report))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
