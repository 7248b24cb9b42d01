"""Rehearse a pod on one machine: N processes here, each with K fake CPU devices, over gloo.

  python -m fae_jax.multiprocess --num_processes=2 --devices_per_process=4 --log_dir=/tmp/mh \
      -- python -m fae_jax.main --config=configs/demo.py:random_encoder,tiny --workdir=/tmp/mh/run

Each process gets `JAX_PLATFORMS=cpu`, `--xla_force_host_platform_device_count=K` in `XLA_FLAGS`
and the coordinator address (a free local port), process count and its process id in
`FAE_JAX_COORDINATOR_ADDRESS`, `FAE_JAX_NUM_PROCESSES` and `FAE_JAX_PROCESS_ID`, which
`fae_jax.multihost.initialize` (called by `fae_jax.main`) reads. Gloo CPU collectives are
selected there. Output: every line streamed prefixed `[pI]`, and each process's whole log in
`<log_dir>/process_<I>.log`.

Failure is clean: when any process exits non-zero, or the time limit passes, every other process
is stopped (SIGTERM, then SIGKILL after a grace period), the failing process's log tail is
printed, and the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from fae_jax import multihost

TAIL_LINES = 40


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, devices: int, address: str) -> dict:
  """The environment of process `index`: CPU platform, K devices, coordinator parameters."""
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env[multihost.ENV_COORDINATOR] = address
  env[multihost.ENV_NUM_PROCESSES] = str(count)
  env[multihost.ENV_PROCESS_ID] = str(index)
  env["PYTHONUNBUFFERED"] = "1"
  return env


@dataclasses.dataclass
class Result:
  returncode: int  # 0 when every process exited 0
  returncodes: list[int | None]  # per process; None = still running when stopped
  failed: int | None  # index of the first process that failed (None: none, or the time limit)
  timed_out: bool
  logs: list[str]  # per-process log files

  def tail(self, index: int, lines: int = TAIL_LINES) -> str:
    with open(self.logs[index], errors="replace") as f:
      return "".join(f.readlines()[-lines:])


def _pump(proc: subprocess.Popen, log_path: str, prefix: str, stream) -> None:
  with open(log_path, "w") as log:
    for line in iter(proc.stdout.readline, ""):
      log.write(line)
      log.flush()
      if stream is not None:
        stream.write(prefix + line)
        stream.flush()


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to each still-running process group, SIGKILL to what remains after `grace_s`."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
      try:
        os.killpg(p.pid, sig)  # its own session (start_new_session): the process and children
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
      time.sleep(0.1)
  for p in procs:
    p.wait()


def launch(
  command: Sequence[str],
  num_processes: int,
  devices_per_process: int,
  log_dir: str | None = None,
  timeout_s: float | None = None,
  grace_s: float = 10.0,
  stream=sys.stdout,
  env: dict[str, str] | None = None,
) -> Result:
  """Runs `command` as `num_processes` cooperating JAX processes; returns when all have ended.

  Args:
    command: argv run by every process (the same on all, like on a pod).
    num_processes, devices_per_process: N processes x K fake CPU devices.
    log_dir: where `process_<i>.log` go (a new temporary directory when None).
    timeout_s: stop everything after this many seconds (None: no limit).
    grace_s: how long stopped processes get between SIGTERM and SIGKILL.
    stream: where prefixed lines are streamed (None: only the log files).
    env: base environment (default `os.environ`).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
      f"num_processes={num_processes}, devices_per_process={devices_per_process}: both >= 1."
    )
  if not command:
    raise ValueError("No command given; put it after `--`.")
  log_dir = log_dir or tempfile.mkdtemp(prefix="fae_jax_multiprocess_")
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env)
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(num_processes)]
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(
      list(command),
      env=process_env(base, i, num_processes, devices_per_process, address),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      text=True,
      errors="replace",
      start_new_session=True,
    )
    t = threading.Thread(target=_pump, args=(p, logs[i], f"[p{i}] ", stream), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  start = time.monotonic()
  failed, timed_out = None, False
  main_thread = threading.current_thread() is threading.main_thread()
  if main_thread:  # SIGTERM to the launcher stops the processes like Ctrl-C does
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
  try:
    while True:
      codes = [p.poll() for p in procs]
      bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        failed = bad[0]
        break
      if all(c == 0 for c in codes):
        break
      if timeout_s is not None and time.monotonic() - start > timeout_s:
        timed_out = True
        break
      time.sleep(0.2)
  finally:  # also on Ctrl-C / SIGTERM: never leave processes behind
    if main_thread:  # a second Ctrl-C must not interrupt the stopping itself
      previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop(procs, grace_s)
    for t in pumps:
      t.join(timeout=10)
    if main_thread:
      signal.signal(signal.SIGINT, previous_int)
      signal.signal(signal.SIGTERM, previous_term)
  codes = [p.returncode for p in procs]
  ok = failed is None and not timed_out
  return Result(0 if ok else 1, codes, failed, timed_out, logs)


def _report_failure(result: Result, timeout_s: float | None, out) -> None:
  if result.timed_out:
    out.write(f"\nTime limit of {timeout_s} s passed; stopped every process.\n")
    shown = range(len(result.logs))
  else:
    out.write(
      f"\nProcess {result.failed} exited with code {result.returncodes[result.failed]}; "
      "stopped the others.\n"
    )
    shown = [result.failed]
  for i in shown:
    out.write(f"--- last {TAIL_LINES} lines of process {i} ({result.logs[i]}) ---\n")
    out.write(result.tail(i))
  out.write(f"Exit codes: {result.returncodes}\n")
  out.flush()


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    sys.stderr.write("usage: python -m fae_jax.multiprocess [options] -- COMMAND ...\n")
    return 2
  cut = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m fae_jax.multiprocess", description=__doc__)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--log_dir", default=None, help="default: a new temporary directory")
  parser.add_argument("--timeout_s", type=float, default=None, help="default: no limit")
  parser.add_argument("--grace_s", type=float, default=10.0)
  args = parser.parse_args(argv[:cut])
  result = launch(
    argv[cut + 1 :],
    args.num_processes,
    args.devices_per_process,
    log_dir=args.log_dir,
    timeout_s=args.timeout_s,
    grace_s=args.grace_s,
  )
  if result.returncode:
    _report_failure(result, args.timeout_s, sys.stderr)
  else:
    sys.stdout.write(f"All {args.num_processes} processes succeeded; logs: {result.logs}\n")
  return result.returncode


if __name__ == "__main__":
  sys.exit(main())
