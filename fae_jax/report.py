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
)
_GENERATOR_LINES = (
  ("fd_dinov2_untrained", "FD-DINOv2, untrained generator", "{:.2f}"),
  ("bits_per_dim", "bits/dim (final train window)", "{:.3f}"),
  ("grid_png_guided", "sample grid, guided", "{}"),
  ("grid_png_unguided", "sample grid, unguided", "{}"),
)


_GENERATORS = ("diffusion", "flow")
# The quality table's columns: (header, key prefix, format); a row's key is the prefix plus its
# suffix (e.g. `fd_dinov2` + `_guided`). Columns no row has are left out.
_QUALITY_COLUMNS = (
  ("FD-DINOv2", "fd_dinov2", "{:.2f}"),
  ("class cons.", "class_consistency", "{:.3f}"),
  ("prec. DINOv2", "precision_dinov2", "{:.3f}"),
  ("recall DINOv2", "recall_dinov2", "{:.3f}"),
  ("FID", "fid", "{:.2f}"),
  ("sFID", "sfid", "{:.2f}"),
  ("IS", "inception_score", "{:.1f}"),
  ("precision", "precision", "{:.3f}"),
  ("recall", "recall", "{:.3f}"),
)


def quality_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """`(row label, {column prefix: value})` from the real floor through the reconstructions to
  each generator (the `evaluate` stage's sections, all on the same held-out images)."""
  rows = []
  real = report.get("real", {})
  if real:
    floor = {"fd_dinov2": real.get("fd_dinov2_floor")}
    floor["class_consistency"] = real.get("probe_top1_eval")
    rows.append(("real images (floor; train vs held-out)", floor))
  recon = report.get("recon", {})
  for suffix, label in (("_noisy", "noisy-feature path"), ("", "full path")):
    values = {p: recon.get(p + suffix) for _, p, _ in _QUALITY_COLUMNS}
    if any(v is not None for v in values.values()):
      rows.append((f"reconstructions, {label}", values))
  for generator in _GENERATORS:
    section = report.get(generator, {})
    for setting in ("unguided", "guided"):
      values = {p: section.get(f"{p}_{setting}") for _, p, _ in _QUALITY_COLUMNS}
      if any(v is not None for v in values.values()):
        rows.append((f"{generator}, {setting}", values))
  return rows


def quality_table(report: dict[str, Any]) -> str:
  """The quality rows as one aligned table ('' when the report has none)."""
  rows = quality_rows(report)
  if not rows:
    return ""
  columns = [c for c in _QUALITY_COLUMNS if any(v.get(c[1]) is not None for _, v in rows)]
  cells = [["", *(h for h, _, _ in columns)]]
  for label, values in rows:
    cells.append(
      [label, *("-" if values.get(p) is None else fmt.format(values[p]) for _, p, fmt in columns)]
    )
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
  lines = [
    "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))])
    for r in cells
  ]
  real = report.get("real", {})
  note = "Quality, stage by stage, against the same held-out images"
  if "num_samples" in real:
    note += f" ({real['num_samples']})"
  return "\n".join([note + ":", *lines])


def summary(report: dict[str, Any]) -> str:
  """A short human-readable summary of a report: headline numbers, grids, the quality table
  (floor -> reconstructions -> generators) and stage times."""
  rows = [
    (label, fmt.format(report[s][k]))
    for s, k, label, fmt in _SUMMARY_LINES
    if k in report.get(s, {})
  ]
  for generator in _GENERATORS:
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
  lines = [f"  {label:<{width}}  {value}" for label, value in rows]
  table = quality_table(report)
  if table:
    at = next((i for i, (label, _) in enumerate(rows) if label.startswith("time:")), len(rows))
    lines[at:at] = ["", *(f"  {line}" for line in table.splitlines()), ""]
  return "\n".join(lines)
