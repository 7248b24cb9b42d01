"""`report.json`: the run's machine-readable summary, one object per stage.

Each stage adds its own keys (e.g. `encode.images_per_second`) and `stage_seconds.<stage>`;
a rerun updates what it recomputes and keeps the rest. Written atomically by process 0 only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from etils import epath

REPORT_NAME = "report.json"


def read_report(workdir: str | os.PathLike) -> dict[str, Any]:
  path = epath.Path(workdir) / REPORT_NAME
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def write_json_atomic(path: epath.Path, obj: Any) -> None:
  """Writes JSON to a temporary sibling and renames it, so readers never see half a file."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


def update_report(
  workdir: str | os.PathLike,
  stage: str,
  values: dict[str, Any] | None,
  seconds: float | None = None,
) -> dict[str, Any]:
  """Merges `values` into `report[stage]` and records `stage_seconds[stage]`."""
  if jax.process_index() != 0:
    return {}
  path = epath.Path(workdir) / REPORT_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  report = read_report(workdir)
  if values:
    report.setdefault(stage, {}).update(values)
  if seconds is not None:
    report.setdefault("stage_seconds", {})[stage] = round(float(seconds), 2)
  write_json_atomic(path, report)
  return report
