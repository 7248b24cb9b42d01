"""launch/tpu.py: the dry run prints the gcloud commands a pod run needs, and refuses bad input."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location(
    "launch_tpu", os.path.join(ROOT, "launch", "tpu.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load()

ARGS = [
  "--config=configs/imagenet.py",
  "--workdir=gs://bucket/run1",
  "--name=fae-run1",
  "--zone=us-east5-a",
  "--accelerator=v5p-64",
]


def _dry_run(*extra: str) -> list[list[str]]:
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "tpu.py"), *ARGS, *extra],
    check=True,
    capture_output=True,
    text=True,
    cwd=ROOT,
  ).stdout
  assert "dry run: nothing was executed" in out
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_dry_run_prints_every_step():
  commands = _dry_run("--config.fae.train.num_steps=10")
  joined = [" ".join(c) for c in commands]
  create = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
  assert "fae-run1" in create and "--zone=us-east5-a" in create
  assert "--accelerator-type=v5p-64" in create and "--version=v2-alpha-tpuv5" in create
  # install: the committed tree is archived, copied to and installed on every worker
  assert commands[1][:2] == ["git", "archive"]
  scp = next(c for c in commands if c[4:5] == ["scp"])
  assert "--worker=all" in scp
  install = next(j for j in joined if "pip install" in j)
  assert "--worker=all" in install and ".[tpu]" in install
  # run: fae_jax.main on every worker with the config, the GCS workdir and the extra flags
  run = next(c for c in commands if any("fae_jax.main" in part for part in c))
  assert "--worker=all" in run
  remote = next(part for part in run if part.startswith("--command="))
  main = shlex.split(remote.split("nohup ", 1)[1].split(" > ", 1)[0])
  assert main[:3] == ["python3", "-m", "fae_jax.main"]
  assert "--config=configs/imagenet.py" in main and "--workdir=gs://bucket/run1" in main
  assert "--distributed=on" in main and "--config.fae.train.num_steps=10" in main
  # tail worker 0's log, then delete the slice
  assert any("--worker=0" in c and "tail" in " ".join(c) for c in commands)
  assert commands[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


def test_queued_spot_and_keep():
  commands = _dry_run("--spot", "--keep", "--steps=create,run,delete")
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in commands[0] and "--node-id=fae-run1" in commands[0]
  assert not any("delete" in c for c in commands)  # --keep
  assert not any(c[:2] == ["git", "archive"] for c in commands)  # install not asked for


@pytest.mark.parametrize(
  "bad, message",
  [
    (["--workdir=/tmp/run"], "gs://"),
    (["--accelerator=v5p64"], "not a Cloud TPU accelerator type"),
    (["--steps=create,launch"], "unknown ['launch']"),
    (["--learning_rate=3"], "only --config.<field>=<value>"),
  ],
)
def test_bad_arguments_are_refused(bad, message, capsys):
  argv = [a for a in ARGS if not any(a.split("=")[0] == b.split("=")[0] for b in bad)] + bad
  with pytest.raises(SystemExit) as e:
    tpu.parse_args(argv)
  # argparse errors go to stderr (exit code 2); our own SystemExit carries the message
  said = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
  assert message in said, said


def test_runtime_version_by_generation():
  assert tpu.accelerator_generation("v5litepod-256") == "v5litepod"
  args, _ = tpu.parse_args([a for a in ARGS if "accelerator" not in a] + ["--accelerator=v6e-64"])
  assert args.version == "v2-alpha-tpuv6e"
