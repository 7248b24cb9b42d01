"""The local multi-process launcher (fae_jax.multiprocess) and real multi-process JAX runs.

Each JAX check runs 2 processes x 4 fake CPU devices over gloo (tests/multihost_worker.py).
"""

import io
import os
import pathlib
import sys

import pytest

from fae_jax import multiprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "multihost_worker.py")


def _env():
  # The worker must import this checkout's fae_jax (a script's own directory comes first).
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _run(tmp_path, command, timeout_s=240, **kwargs):
  out = io.StringIO()
  result = multiprocess.launch(
    command,
    2,
    4,
    log_dir=str(tmp_path / "logs"),
    timeout_s=timeout_s,
    stream=out,
    env=_env(),
    **kwargs,
  )
  return result, out.getvalue()


def test_process_env_sets_devices_platform_and_coordinates():
  env = multiprocess.process_env(
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}, 1, 2, 4, "h:1"
  )
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu"
  assert (env["FAE_JAX_COORDINATOR_ADDRESS"], env["FAE_JAX_NUM_PROCESSES"]) == ("h:1", "2")
  assert env["FAE_JAX_PROCESS_ID"] == "1"


def test_two_processes_run_a_jitted_collective(tmp_path):
  result, out = _run(tmp_path, [sys.executable, WORKER, "collective"])
  assert result.returncode == 0, out
  for i in range(2):
    assert f"OK collective {i}" in pathlib.Path(result.logs[i]).read_text()
    assert f"[p{i}] OK collective {i}" in out  # streamed with the process prefix


def test_collective_export_saves_and_loads_sharded_params(tmp_path):
  result, out = _run(tmp_path, [sys.executable, WORKER, "params_store", str(tmp_path / "out")])
  assert result.returncode == 0, out
  assert all(f"OK params_store {i}" in pathlib.Path(result.logs[i]).read_text() for i in range(2))
  assert (tmp_path / "out" / "export" / "model.json").exists()


def test_weights_of_process_zero_reach_every_process_and_exports_are_collective(tmp_path):
  # convert's pattern (share_from_primary, then a collective save) and pixel's replace_export.
  result, out = _run(tmp_path, [sys.executable, WORKER, "share_export", str(tmp_path / "out")])
  assert result.returncode == 0, out
  assert all(f"OK share_export {i}" in pathlib.Path(result.logs[i]).read_text() for i in range(2))


def test_stage_decisions_stats_and_loss_curve_agree_across_processes(tmp_path):
  (tmp_path / "out").mkdir()
  result, out = _run(tmp_path, [sys.executable, WORKER, "decisions", str(tmp_path / "out")])
  assert result.returncode == 0, out
  assert all(f"OK decisions {i}" in pathlib.Path(result.logs[i]).read_text() for i in range(2))


def test_evaluate_gathers_samples_sharded_over_both_processes(tmp_path):
  result, out = _run(tmp_path, [sys.executable, WORKER, "evaluate_gather"])
  assert result.returncode == 0, out
  assert all(
    f"OK evaluate_gather {i}" in pathlib.Path(result.logs[i]).read_text() for i in range(2)
  )


def test_one_failing_process_stops_the_others_and_shows_its_tail(tmp_path, capsys):
  # Process 1 fails at once; process 0 would run for 10 minutes.
  script = (
    "import os, sys, time\n"
    "if os.environ['FAE_JAX_PROCESS_ID'] == '1':\n"
    "  print('process one gives up'); sys.exit(3)\n"
    "print('process zero waits', flush=True); time.sleep(600)\n"
  )
  log_dir = tmp_path / "logs"
  code = multiprocess.main(
    [
      "--num_processes=2",
      "--devices_per_process=1",
      f"--log_dir={log_dir}",
      "--grace_s=2",
      "--",
      sys.executable,
      "-c",
      script,
    ]
  )
  err = capsys.readouterr().err
  assert code != 0
  assert "Process 1 exited with code 3" in err
  assert "process one gives up" in err  # the failing process's log tail
  assert "Exit codes: [-15, 3]" in err  # process 0 was stopped (SIGTERM), not left running


def test_time_limit_stops_every_process(tmp_path):
  result, out = _run(
    tmp_path,
    [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
    timeout_s=2,
    grace_s=2,
  )
  assert result.returncode != 0 and result.timed_out and result.failed is None
  assert result.returncodes == [-15, -15]
  assert "up" in result.tail(0) and "up" in result.tail(1)


def test_launcher_needs_a_command():
  assert multiprocess.main(["--num_processes=2"]) == 2
  with pytest.raises(ValueError, match="No command"):
    multiprocess.launch([], 2, 1)
