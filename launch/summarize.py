"""Collects each sweep point's final metrics (`<root>/<point>/report.json`) into one table.

python launch/summarize.py runs/sweep_depth                  # Markdown
python launch/summarize.py runs/sweep_depth --format=csv --out=summary.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os

# The FAE's own metrics beside the generators' quality (FD-DINOv2, class consistency, and FID
# where evaluate.inception_dir is set) that `evaluate` writes under each generator's name.
DEFAULT_STAGES = ("fae", "diffusion", "flow")


def flatten(prefix: str, obj, out: dict) -> dict:
  if isinstance(obj, dict):
    for k, v in obj.items():
      flatten(f"{prefix}.{k}" if prefix else k, v, out)
  elif isinstance(obj, int | float | str | bool) or obj is None:
    out[prefix] = obj
  return out


def collect(root: str, stages=DEFAULT_STAGES) -> tuple[list[str], list[dict]]:
  rows = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "report.json")
    if name == "shared" or not os.path.exists(path):
      continue
    with open(path) as f:
      report = json.load(f)
    row = {"point": name}
    for stage in stages:
      flatten(stage, report.get(stage, {}), row)
    rows.append(row)
  columns = ["point"] + sorted({k for r in rows for k in r} - {"point"})
  return columns, rows


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def to_markdown(columns, rows) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def to_csv(columns, rows) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("root")
  parser.add_argument("--format", choices=["md", "csv"], default="md")
  parser.add_argument("--stages", default=",".join(DEFAULT_STAGES))
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  columns, rows = collect(args.root, tuple(args.stages.split(",")))
  if not rows:
    raise SystemExit(f"No <point>/report.json under {args.root}: has the sweep run?")
  text = to_markdown(columns, rows) if args.format == "md" else to_csv(columns, rows)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
