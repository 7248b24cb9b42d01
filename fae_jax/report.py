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

from fae_jax.fileio import write_json_atomic

REPORT_NAME = "report.json"


def read_report(workdir: str | os.PathLike) -> dict[str, Any]:
  path = epath.Path(workdir) / REPORT_NAME
  if not path.exists():
    return {}
  return json.loads(path.read_text())


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


_PIPELINE = ("convert", "encode", "fae", "pixel", "latents", "diffusion", "flow", "evaluate")
# (section, key, label, format) lines of the short summary, in pipeline order; missing keys are
# left out, so a partial run summarises what it has.
_SUMMARY_LINES = (
  ("encode", "images_per_second", "encode: frozen-encoder throughput (images/s)", "{:.1f}"),
  ("fae", "feature_cosine", "fae: held-out feature cosine", "{:.3f}"),
  ("fae", "probe_top1_x", "fae: linear probe top-1 on x", "{:.3f}"),
  ("fae", "probe_top1_xhat", "fae: linear probe top-1 on x_hat", "{:.3f}"),
  ("fae", "probe_top1_z", "fae: linear probe top-1 on z", "{:.3f}"),
  ("pixel", "psnr_full", "pixel: PSNR, full path (dB)", "{:.2f}"),
  ("pixel", "psnr_noisy_features", "pixel: PSNR, noisy-feature path (dB)", "{:.2f}"),
  ("pixel", "rfd_dinov2", "pixel: rFD-DINOv2, full path", "{:.2f}"),
  ("pixel", "grid_png", "pixel: reconstruction grid", "{}"),
  ("real", "fd_dinov2_floor", "real: FD-DINOv2 floor (train vs held-out)", "{:.2f}"),
)
_GENERATOR_LINES = (
  ("fd_dinov2_guided", "FD-DINOv2, guided", "{:.2f}"),
  ("fd_dinov2_unguided", "FD-DINOv2, unguided", "{:.2f}"),
  ("fd_dinov2_untrained", "FD-DINOv2, untrained generator", "{:.2f}"),
  ("class_consistency_guided", "class consistency, guided", "{:.3f}"),
  ("class_consistency_unguided", "class consistency, unguided", "{:.3f}"),
  ("bits_per_dim", "bits/dim (final train window)", "{:.3f}"),
  ("grid_png_guided", "sample grid, guided", "{}"),
  ("grid_png_unguided", "sample grid, unguided", "{}"),
)


def summary(report: dict[str, Any]) -> str:
  """A short human-readable summary of a report: headline numbers, grids and stage times."""
  rows = [
    (label, fmt.format(report[s][k]))
    for s, k, label, fmt in _SUMMARY_LINES
    if k in report.get(s, {})
  ]
  for generator in ("diffusion", "flow"):
    section = report.get(generator, {})
    rows += [
      (f"{generator}: {label}", fmt.format(section[k]))
      for k, label, fmt in _GENERATOR_LINES
      if k in section
    ]
  times = report.get("stage_seconds", {})
  if times:
    order = sorted(
      times, key=lambda n: (_PIPELINE.index(n) if n in _PIPELINE else len(_PIPELINE), n)
    )
    rows += [(f"time: {name} (s)", f"{times[name]:.0f}") for name in order]
    rows.append(("time: all stages (s)", f"{sum(times.values()):.0f}"))
  width = max((len(label) for label, _ in rows), default=0)
  return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
