"""Runs `python -m fae_jax.main` on every worker of a Cloud TPU slice, from one command.

  python launch/tpu.py --config=configs/imagenet.py --workdir=gs://BUCKET/RUN \\
      --name=fae-run1 --zone=us-east5-a --accelerator=v5p-64            # dry run: prints
  python launch/tpu.py ... --run                                        # executes

Steps (`--steps`, default all of them, in this order):
  create   a TPU VM slice (`gcloud compute tpus tpu-vm create`), or with `--queued` a queued
           resource (`gcloud compute tpus queued-resources create`, optionally `--spot`), then
           waits until it is ACTIVE;
  install  packs this checkout (`git archive HEAD`: committed files only, so the slice runs
           exactly a commit), copies it to every worker and `pip install -e .[tpu]` there;
  run      starts `python -m fae_jax.main --config=... --workdir=gs://...` on `--worker=all`
           under nohup (an ssh drop does not kill the run), each worker logging to
           ~/fae_jax_run.log; every process calls `jax.distributed.initialize()`, which finds
           the other workers itself on a Cloud TPU VM;
  tail     follows worker 0's log (Ctrl-C stops following, not the run);
  delete   deletes the slice (or the queued resource). Skipped with `--keep`.

A preempted run is resumed by running the `run` step again with the same workdir: every stage
restarts from its last checkpoint (`--steps=create,install,run` on a new slice after a spot
preemption). Extra `--config.<field>=<value>` flags are passed through to `fae_jax.main`.

The dry run (the default) prints each `gcloud` command exactly as `--run` would execute it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

STEPS = ("create", "install", "run", "tail", "delete")

# Cloud TPU VM runtime (software) versions by TPU generation, from
# https://cloud.google.com/tpu/docs/runtimes (JAX: the base Ubuntu 22.04 images).
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}

REMOTE_DIR = "fae_jax"  # under each worker's home directory
REMOTE_ARCHIVE = "fae_jax_src.tar.gz"
REMOTE_LOG = "fae_jax_run.log"


def accelerator_generation(accelerator: str) -> str:
  """'v5p-64' -> 'v5p'; refuses names gcloud would not accept, with the accepted forms."""
  generation, _, chips = accelerator.rpartition("-")
  if generation not in RUNTIME_VERSIONS or not chips.isdigit():
    raise SystemExit(
      f"--accelerator={accelerator!r} is not a Cloud TPU accelerator type; use "
      f"<generation>-<cores or chips> with generation one of {sorted(RUNTIME_VERSIONS)}, "
      "e.g. v5p-64, v5litepod-256, v6e-64, v4-32."
    )
  return generation


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="e.g. configs/imagenet.py[:preset]")
  parser.add_argument("--workdir", required=True, help="gs://BUCKET/RUN (shared by all workers)")
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-64, v5litepod-256, v6e-64")
  parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  parser.add_argument("--version", default=None, help="TPU runtime version (default: by type)")
  parser.add_argument("--queued", action="store_true", help="create a queued resource")
  parser.add_argument("--spot", action="store_true", help="spot capacity (implies --queued)")
  parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
  parser.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
  parser.add_argument("--run", action="store_true", help="execute (default: print, dry run)")
  parser.add_argument("--poll_seconds", type=float, default=30.0)
  args, extra = parser.parse_known_args(argv)
  bad = [flag for flag in extra if not flag.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}; only --config.<field>=<value> flags pass through.")
  if not args.workdir.startswith("gs://"):
    parser.error(
      f"--workdir={args.workdir!r}: every worker must see the same workdir; use a GCS bucket "
      "path gs://BUCKET/RUN (the TPU VM's service account needs write access to it)."
    )
  steps = tuple(s for s in args.steps.split(",") if s)
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    parser.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}.")
  args.steps = tuple(s for s in STEPS if s in steps and not (s == "delete" and args.keep))
  args.queued = args.queued or args.spot
  args.version = args.version or RUNTIME_VERSIONS[accelerator_generation(args.accelerator)]
  return args, extra


def _where(args: argparse.Namespace) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    args.name,
    *_where(args),
    f"--worker={worker}",
    f"--command={command}",
  ]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  if args.queued:
    create = [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      args.name,
      f"--node-id={args.name}",
      *_where(args),
      f"--accelerator-type={args.accelerator}",
      f"--runtime-version={args.version}",
    ] + (["--spot"] if args.spot else [])
    return [create]
  return [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      args.name,
      *_where(args),
      f"--accelerator-type={args.accelerator}",
      f"--version={args.version}",
    ]
  ]


def _state_command(args: argparse.Namespace) -> list[str]:
  kind = "queued-resources" if args.queued else "tpu-vm"
  field = "state.state" if args.queued else "state"
  return [
    "gcloud",
    "compute",
    "tpus",
    kind,
    "describe",
    args.name,
    *_where(args),
    f"--format=value({field})",
  ]


def install_commands(args: argparse.Namespace, archive: str) -> list[list[str]]:
  scp = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    archive,
    f"{args.name}:{REMOTE_ARCHIVE}",
    *_where(args),
    "--worker=all",
  ]
  setup = (
    f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
    f"tar -xzf ~/{REMOTE_ARCHIVE} -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && "
    "python3 -m pip install --quiet --upgrade pip && "
    "python3 -m pip install --quiet -e '.[tpu]'"
  )
  return [
    ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
    scp,
    _ssh(args, setup),
  ]


def main_command(args: argparse.Namespace, extra: Sequence[str]) -> str:
  """The command every worker runs (one process per worker, all devices of the worker)."""
  main = [
    "python3",
    "-m",
    "fae_jax.main",
    f"--config={args.config}",
    f"--workdir={args.workdir}",
    "--distributed=on",
    *extra,
  ]
  return f"cd ~/{REMOTE_DIR} && nohup {shlex.join(main)} > ~/{REMOTE_LOG} 2>&1 &"


def run_commands(args: argparse.Namespace, extra: Sequence[str]) -> list[list[str]]:
  return [_ssh(args, main_command(args, extra))]


def tail_commands(args: argparse.Namespace) -> list[list[str]]:
  return [_ssh(args, f"tail -n 100 -F ~/{REMOTE_LOG}", worker="0")]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
  if args.queued:
    return [
      [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        args.name,
        *_where(args),
        "--force",
        "--quiet",
      ]
    ]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


def plan(args: argparse.Namespace, extra: Sequence[str]) -> list[tuple[str, list[list[str]]]]:
  """Every step's commands, in order; `create` is followed by a wait (see `wait_until_ready`)."""
  archive = f"/tmp/{args.name}-{REMOTE_ARCHIVE}"
  builders = {
    "create": lambda: create_commands(args),
    "install": lambda: install_commands(args, archive),
    "run": lambda: run_commands(args, extra),
    "tail": lambda: tail_commands(args),
    "delete": lambda: delete_commands(args),
  }
  return [(step, builders[step]()) for step in args.steps]


def wait_until_ready(args: argparse.Namespace) -> None:
  ready = {"ACTIVE", "READY"}
  while True:
    state = subprocess.run(
      _state_command(args), check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"[tpu] {args.name}: {state or 'unknown'}", flush=True)
    if state in ready:
      return
    if state in {"FAILED", "SUSPENDED", "PREEMPTED", "DELETING"}:
      raise SystemExit(f"[tpu] {args.name} is {state}; see `gcloud` for details.")
    time.sleep(args.poll_seconds)


def main(argv: Sequence[str]) -> int:
  args, extra = parse_args(argv)
  for step, commands in plan(args, extra):
    print(f"# {step}")
    for command in commands:
      print(shlex.join(command), flush=True)
      if not args.run:
        continue
      try:
        subprocess.run(command, check=True)
      except KeyboardInterrupt:
        if step != "tail":
          raise
        print("[tpu] stopped following the log; the run goes on.")
      except subprocess.CalledProcessError as e:
        raise SystemExit(
          f"[tpu] step {step!r} failed (exit {e.returncode}): {shlex.join(command)}"
        ) from e
    if step == "create":
      if args.run:
        wait_until_ready(args)
      else:
        print(f"# wait until `{shlex.join(_state_command(args))}` prints ACTIVE/READY")
  if not args.run:
    print("# dry run: nothing was executed; add --run to execute these commands.")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
