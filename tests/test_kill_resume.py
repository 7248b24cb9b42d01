"""Kill anywhere, resume to the same result (`fae_jax.faults`, harness: tests/kill_resume.py).

* `test_killed_and_resumed_run_equals_straight_run[<point>-<signal>]`: the tiny demo pipeline
  killed at a kill point (SIGKILL or SIGTERM), restarted until it finishes, ends with every
  export array, cache file and report number equal, bit for bit, to a run never killed. By
  default (`make test`) three points: SIGKILL inside an encode shard write, SIGKILL while the
  FAE's asynchronous checkpoint save is in flight, SIGTERM while report.json is being replaced.
  Every point and both signals: `FAE_JAX_KILL_ALL=1 pytest -m slow tests/test_kill_resume.py`
  (or `python tests/kill_resume.py`, which prints the README's table).
* The `fae_jax.faults` unit tests: the spec grammar (and the multi-host test's old form), a
  no-op when unset, a kill at the selected hit only, SIGTERM handled by a handler continues.

Cost: the straight run (through `fae` for the default points, the whole pipeline for all) is
made once per session, shared between pytest-xdist workers with a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kill_resume  # noqa: E402

from fae_jax import faults  # noqa: E402

CI_POINTS = (
  ("encode-shard-tmp", "KILL"),
  ("fae-async-save", "KILL"),
  ("report-write-encode", "TERM"),
)
ALL = bool(os.environ.get("FAE_JAX_KILL_ALL"))
CASES = [(p.id, s) for p in kill_resume.POINTS for s in kill_resume.SIGNALS] if ALL else CI_POINTS


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
  """The straight run (through the last stage any selected point is in), once per session."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # `<session dir>/popen-gwN`: share the session dir
  last = max(kill_resume.PIPELINE.index(kill_resume.POINTS_BY_ID[p].stage) for p, _ in CASES)
  stages = kill_resume.PIPELINE[: last + 1]
  name = f"kill_resume/straight-{stages[-1]}"
  with _locked(base / f"{name}.lock"):
    return kill_resume.straight_run(base / name, stages)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "sig"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_killed_and_resumed_run_equals_straight_run(point, sig, straight, tmp_path):
  result = kill_resume.run_point(kill_resume.POINTS_BY_ID[point], sig, tmp_path, straight)
  # SIGKILL: -9. SIGTERM: -15 outside a train loop (Python's default action), 0 inside one
  # (the preemption path: a checkpoint, then `Preempted` exits 0).
  assert result.killed_rc in ((-9,) if sig == "KILL" else (-15, 0)), result
  assert result.restarts >= 1 and result.resumed, result
  assert result.identical and result.max_abs_diff == 0.0, result.differences
  if point == "report-write-encode":  # encode's outputs were complete, its report entry not
    log = (tmp_path / "restart1.log").read_text()
    assert "Stage encode: complete, but not in the report: recomputing its values." in log


# --- fae_jax.faults -----------------------------------------------------------------------------


def test_parse_spec_and_the_old_multihost_form():
  assert faults.parse("cache:shard_done") == {
    "name": "cache:shard_done",
    "at": None,
    "hit": 1,
    "signal": signal.SIGKILL,
    "process": 0,
  }
  spec = faults.parse("export:before_commit,at=fae/export,hit=2,signal=TERM,process=1")
  assert spec == {
    "name": "export:before_commit",
    "at": "fae/export",
    "hit": 2,
    "signal": signal.SIGTERM,
    "process": 1,
  }
  assert faults.parse("fae:15:1") == {
    "name": "train:fae:step",
    "at": "15",
    "hit": 1,
    "signal": signal.SIGKILL,
    "process": 1,
  }
  with pytest.raises(ValueError, match="signal=KILL|TERM"):
    faults.parse("x,signal=HUP")
  with pytest.raises(ValueError, match="cannot read 'when=3'"):
    faults.parse("x,when=3")


def test_point_is_a_no_op_unless_selected(monkeypatch):
  monkeypatch.delenv(faults.ENV, raising=False)
  faults.point("cache:shard_done", "/x/features/train/shard-00000-of-00003.array_record")
  monkeypatch.setenv(faults.ENV, "cache:shard_done,at=shard-00001-of-00003.array_record")
  faults.point("cache:shard_done", "/x/features/train/shard-00000-of-00003.array_record")
  faults.point("cache:shard_before_rename", "/x/features/train/shard-00001-of-00003.array_record")


_CHILD = """
import signal, sys
from fae_jax import faults
if sys.argv[1] == "handled":
  signal.signal(signal.SIGTERM, lambda *a: print("handled", flush=True))
for i in range(3):
  faults.point("demo:point", f"/w/item-{i}")
  faults.point("demo:point", f"/w/item-{i}")
  print("passed", i, flush=True)
"""


def _child(spec: str, mode: str = "plain") -> subprocess.CompletedProcess:
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {**os.environ, faults.ENV: spec, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=120
  )


def test_point_kills_at_the_selected_hit_with_the_selected_signal():
  killed = _child("demo:point,at=item-1,hit=2")
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert killed.stdout.split("\n")[:1] == ["passed 0"] and "passed 1" not in killed.stdout
  assert "killing process 0 now with SIGKILL" in killed.stderr
  termed = _child("demo:point,signal=TERM")
  assert termed.returncode == -signal.SIGTERM and "passed" not in termed.stdout
  # A SIGTERM handler (the train loop's preemption flag) runs, and the process goes on.
  handled = _child("demo:point,at=item-2,signal=TERM", "handled")
  assert handled.returncode == 0, handled.stderr
  assert handled.stdout.split() == "passed 0 passed 1 handled passed 2".split()


def test_log_window_round_trip(tmp_path):
  """A resumed run's first logged window holds the steps before the checkpoint (bit-exact)."""
  from fae_jax.train import metrics as metrics_lib

  history = [
    {"train/loss": np.float32(0.1 * i + 1 / 3), "train/per_example": np.float32([i, 1 / 7])}
    for i in range(3)
  ]
  metrics_lib.save_window(tmp_path, 7, history, keep_steps=(4,))
  metrics_lib.save_window(tmp_path, 9, history[:1], keep_steps=(7,))
  assert sorted(p.name for p in (tmp_path / metrics_lib.WINDOW_DIR).iterdir()) == [
    "7.json",
    "9.json",
  ]  # 4 had no window; windows of dropped checkpoints go
  loaded = metrics_lib.load_window(tmp_path, 7)
  for a, b in zip(history, loaded, strict=True):
    for name in a:
      assert np.array_equal(np.asarray(a[name], np.float64), b[name])
  assert metrics_lib.load_window(tmp_path, 8) == [] and metrics_lib.load_window(tmp_path, 0) == []
