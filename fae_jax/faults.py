"""Fault injection: named kill points where a crash is most dangerous, for the restart tests.

The pipeline calls `point(name, index)` at a few places: after a temporary file is written but
before it is renamed, between cache shards, right after an asynchronous checkpoint save started,
after a train step, between the pixel stage's two phases, before an export is committed. Unless
the environment variable `FAE_JAX_KILL_AT` selects one of them, `point` returns at once (one
dictionary look-up: the hooks cost nothing in a normal run).

  FAE_JAX_KILL_AT=<name>[,at=<index>][,hit=<n>][,signal=KILL|TERM][,process=<p>]

kills process `p` (default 0) with the signal (default SIGKILL) the `n`-th time (default 1) it
reaches point `<name>` with an index equal to `<index>` (any index when `at` is not given; a
string index also matches when it ends with `/<index>`, so `at=fae/export` selects
`<workdir>/fae/export`). The kill is `os.kill(os.getpid(), signal)`: SIGKILL gives the process no
chance to clean up; SIGTERM inside a train loop goes through its preemption path (a checkpoint at
the next step boundary, then `Preempted` exits 0), elsewhere Python's default action ends the
process at once. The multi-host restart test's form `<stage>:<step>:<process>` is kept: it is
the point `train:<stage>:step` at that step, SIGKILL, that process.

Points (`index` in brackets):

  train:<stage>:step [step]        after a step and its checkpoint decision; checkpoints are
                                   finished first, and with several processes all meet first
  train:<stage>:saving [step]      an asynchronous checkpoint save has started, not finished
  atomic_write:before_replace [path]   a temporary sibling is written, not yet renamed
                                   (`multihost.write_bytes_atomic`: report, manifests, shards of
                                   evaluation samples, results, statistics)
  cache:shard_before_rename [path] an array-cache shard is written and checksummed, not renamed
  cache:shard_done [path]          an array-cache shard is complete (between shards)
  export:before_commit [directory] an export's parameters are written, its marker is not
  pixel:between_phases [phase]     phase `noisy` is trained and exported, `finetune` not begun
  evaluate:shard_done [path]       a shard of an evaluation pass is written (between shards)

`tests/kill_resume.py` kills the tiny pipeline at each of them and checks that the restarted
run ends with the same exports and `report.json` as a run never killed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any

ENV = "FAE_JAX_KILL_AT"
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
_LEGACY = re.compile(r"^([\w/.-]+):(\d+):(\d+)$")  # <stage>:<step>:<process>
_hits: dict[str, int] = {}  # spec -> matching calls so far (this process)


def parse(spec: str) -> dict[str, Any]:
  """`{"name", "at", "hit", "signal", "process"}` of a `FAE_JAX_KILL_AT` value (module doc).

  Raises:
    ValueError: an unknown option or signal, naming the accepted ones.
  """
  legacy = _LEGACY.match(spec)
  if legacy:
    stage, step, process = legacy.groups()
    return {
      "name": f"train:{stage}:step",
      "at": step,
      "hit": 1,
      "signal": signal.SIGKILL,
      "process": int(process),
    }
  name, *options = spec.split(",")
  out = {"name": name.strip(), "at": None, "hit": 1, "signal": signal.SIGKILL, "process": 0}
  for option in options:
    key, _, value = option.partition("=")
    key, value = key.strip(), value.strip()
    if key == "at":
      out["at"] = value
    elif key in ("hit", "process"):
      out[key] = int(value)
    elif key == "signal" and value.upper().removeprefix("SIG") in SIGNALS:
      out["signal"] = SIGNALS[value.upper().removeprefix("SIG")]
    else:
      raise ValueError(
        f"{ENV}={spec!r}: cannot read {option!r}; options are at=<index>, hit=<n>, "
        f"signal=KILL|TERM, process=<p> (see fae_jax/faults.py)."
      )
  return out


def _matches(at: str | None, index: Any) -> bool:
  if at is None:
    return True
  text = str(index)
  return text == at or text.endswith("/" + at)


def point(
  name: str,
  index: Any = None,
  *,
  before: Callable[[], None] | None = None,
  collective: bool = False,
) -> None:
  """A kill point (module doc); a no-op unless `FAE_JAX_KILL_AT` selects it.

  Args:
    name: the point's name.
    index: what `at=` is compared with (a step, a path, a phase).
    before: run before the kill, on every process (e.g. wait for checkpoint writes).
    collective: every process reaches this point; with several processes they meet at a barrier
      before the chosen one dies (so the others are not mid-collective with it).
  """
  spec = os.environ.get(ENV)
  if not spec:
    return
  target = parse(spec)
  if target["name"] != name or not _matches(target["at"], index):
    return
  _hits[spec] = _hits.get(spec, 0) + 1
  if _hits[spec] != target["hit"]:
    return
  import jax
  from absl import logging

  from fae_jax import multihost

  if before is not None:
    before()
  if collective:
    multihost.barrier(f"kill-at:{name}:{index}")
  process = target["process"]
  if jax.process_index() != process:
    return
  sig = signal.Signals(target["signal"])
  logging.warning(
    "%s=%s: at %s (%s), killing process %d now with %s.", ENV, spec, name, index, process, sig.name
  )
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), sig)
