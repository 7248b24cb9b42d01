"""Expands a config's sweep into one `fae_jax.main` command per point.

  python launch/sweep.py --config=configs/demo.py:sweep=adapter_depth --root=runs/sweep_depth
  python launch/sweep.py --config=configs/demo.py:sweep=adapter_depth --root=... --mode=local
  python launch/summarize.py runs/sweep_depth            # one table of every point's metrics

Extra `--config.<field>=<value>` flags are passed to every point (e.g. a shorter schedule).

A config file defines `sweep(name) -> list[dict]` (each dict: dotted config field -> value) and
`sweep_stages(name) -> {"shared": (...), "point": (...)}`. The shared upstream stages (the encoder,
the feature cache, the noisy-feature pixel decoder; also the FAE and latents when only the
generator varies) run once in `<root>/shared`; every point has its own workdir
`<root>/<name>=<value>` that runs the point's stages (e.g. FAE -> latents -> a generator ->
evaluate) and reads what it does not produce from the shared run (`config.upstream_workdir`).
`launch/summarize.py` then puts the generator's FD beside the FAE metrics.
`--mode=dry` (default) prints the commands; `--mode=local` runs them in sequence here; on a pod,
hand the printed commands to your scheduler (one job per point).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  sys.path.insert(0, repo)
  spec.loader.exec_module(module)
  return module


def split_config_arg(config_arg: str) -> tuple[str, str | None, str]:
  """'configs/x.py:sweep=a,tiny' -> ('configs/x.py', 'a', 'tiny')."""
  path, _, arg = config_arg.partition(":")
  rest, sweep = [], None
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    if key == "sweep":
      sweep = value
    else:
      rest.append(item)
  return path, sweep, ",".join(rest)


def format_value(value) -> str:
  if isinstance(value, tuple | list):
    return repr(tuple(value))
  return str(value)


def point_name(overrides: dict) -> str:
  return ",".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in overrides.items())


def build_commands(
  config_arg: str,
  root: str,
  python: str = sys.executable,
  extra: list[str] = (),
  points: list[int] | None = None,
) -> list[list[str]]:
  """One command for the shared upstream stages, then one per sweep point.

  `extra` flags (e.g. `--config.fae.train.num_steps=200`) are appended to every point;
  `points` (indices into the sweep) restricts which points run.
  """
  path, sweep, rest = split_config_arg(config_arg)
  module = load_config_module(path)
  if not sweep:
    raise SystemExit(f"--config={config_arg} names no sweep; add ':sweep=NAME'.")
  try:
    all_points = module.sweep(sweep)
  except ValueError as e:  # before any command is built or run
    raise SystemExit(f"--config={config_arg}: {e} Nothing was run.") from None
  if points is not None:
    bad = [i for i in points if not 0 <= i < len(all_points)]
    if bad:
      raise SystemExit(
        f"--points {bad} out of range: sweep {sweep!r} has {len(all_points)} points."
      )
  chosen = all_points if points is None else [all_points[i] for i in points]
  config_flag = f"--config={path}" + (f":{rest}" if rest else "")
  shared = os.path.join(root, "shared")
  stages = module.sweep_stages(sweep)
  commands = [
    [
      python,
      "-m",
      "fae_jax.main",
      config_flag,
      f"--workdir={shared}",
      f"--config.stages={format_value(stages['shared'])}",
    ]
    + [f"--config.{k}={format_value(v)}" for k, v in stages.get("shared_overrides", {}).items()]
  ]
  for overrides in chosen:
    cmd = [
      python,
      "-m",
      "fae_jax.main",
      config_flag,
      f"--workdir={os.path.join(root, point_name(overrides))}",
      f"--config.upstream_workdir={shared}",
      f"--config.stages={format_value(stages['point'])}",
    ]
    cmd += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    cmd += list(extra)
    commands.append(cmd)
  return commands


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="path.py:sweep=NAME[,presets]")
  parser.add_argument("--root", required=True, help="root directory of the sweep's workdirs")
  parser.add_argument("--mode", choices=["dry", "local"], default="dry")
  parser.add_argument("--points", default=None, help="comma-separated point indices (default all)")
  args, extra = parser.parse_known_args(argv)
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}; extra flags must be --config.<field>=<value>")
  points = [int(i) for i in args.points.split(",")] if args.points else None
  commands = build_commands(args.config, args.root, extra=extra, points=points)
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if args.mode == "local":
      subprocess.run(cmd, check=True)
  if args.mode == "local":
    print(f"\nDone. Summary: python launch/summarize.py {args.root}")


if __name__ == "__main__":
  main()
