"""The loop's metric log: `<stage>/train_log.jsonl`, one JSON object per logged step.

A log that needs no TensorBoard to read; stages and sweeps summarise loss curves from it.
Process 0 writes it. On local disk lines are appended; on an object store (`gs://`, where an
object cannot be appended to) the whole log is rewritten as one object per write (logging is
every `log_every` steps, so the log stays small), continuing a log left by an earlier run.
"""

from __future__ import annotations

import json

import numpy as np
from clu import metric_writers
from etils import epath

from fae_jax import multihost

LOG_NAME = "train_log.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Appends scalars as JSON lines `{"step": s, name: value, ...}`; ignores everything else."""

  def __init__(self, path: epath.Path):
    self._path = epath.Path(path)
    self._lines: list[str] | None = None  # object stores: the whole log, rewritten per write
    if multihost.is_object_store(self._path):
      self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step, scalars):
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(row) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      multihost.write_text_atomic(self._path, "".join(self._lines))
      return
    with self._path.open("a") as f:
      f.write(line)

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def logged_loss_curve(stage_dir: epath.PathLike, key: str = "train/loss") -> dict[str, float]:
  """First and last logged values of `key` from `<stage_dir>/train_log.jsonl` ({} if none):
  `{"train_loss_first", "train_loss_last"}`.

  Collective: process 0 (the log's writer) reads it and every host gets its values.
  """
  path = epath.Path(stage_dir) / LOG_NAME
  return multihost.decide_once(f"loss-curve:{path}:{key}", lambda: _loss_curve(path, key))


def _loss_curve(path: epath.Path, key: str) -> dict[str, float]:
  if not path.exists():
    return {}
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  values = [r[key] for r in rows if key in r]
  if not values:
    return {}
  return {"train_loss_first": float(values[0]), "train_loss_last": float(values[-1])}


# --- The open logging window of a checkpoint ------------------------------------------------------
# A run resumed from a checkpoint between two logs (a preemption, or `checkpoint_every` not a
# multiple of `log_every`) would log a window of fewer steps than a run never stopped: its
# average, e.g. the final `train_loss_last` of the report, would differ. So each save writes the
# per-step metrics logged since the last log to `<stage>/log_window/<step>.json` (before the
# checkpoint, so a checkpoint never lacks it), and a resumed run starts its window from them.
WINDOW_DIR = "log_window"


def save_window(stage_dir: epath.PathLike, step: int, history, keep_steps=()) -> None:
  """Writes the open window at `step` (process 0) and drops the windows of steps not in
  `keep_steps` (the checkpoints still kept)."""
  if not multihost.is_primary():
    return
  directory = epath.Path(stage_dir) / WINDOW_DIR
  directory.mkdir(parents=True, exist_ok=True)
  rows = [{k: np.asarray(v).tolist() for k, v in h.items()} for h in history]
  multihost.write_text_atomic(directory / f"{int(step)}.json", json.dumps(rows))
  keep = {int(s) for s in keep_steps} | {int(step)}
  for path in directory.glob("*.json"):
    if path.stem.isdigit() and int(path.stem) not in keep:
      path.unlink(missing_ok=True)


def load_window(stage_dir: epath.PathLike, step: int) -> list[dict[str, np.ndarray]]:
  """The window saved with the checkpoint at `step` ([] when there is none)."""
  path = epath.Path(stage_dir) / WINDOW_DIR / f"{int(step)}.json"
  if not step or not path.exists():
    return []
  return [
    {k: np.asarray(v, np.float64) for k, v in row.items()} for row in json.loads(path.read_text())
  ]


class TimeSplit:
  """Wall time of a train loop by kind, for the end-of-stage line and `time/*` scalars.

  Kinds: `compile` (the first step of this run: tracing, compilation, first execution), `data`
  (waiting for the input pipeline), `step` (dispatching steps and waiting for their results),
  `logging` (metrics to the host and writers, progress), `checkpoint` (metric window + save),
  `eval` (the stage's periodic evaluation), and `other` (the rest of the loop: Python between).
  """

  KINDS = ("compile", "data", "step", "logging", "checkpoint", "eval")

  def __init__(self):
    import time

    self._clock = time.perf_counter
    self._start = self._clock()
    self.seconds = dict.fromkeys(self.KINDS, 0.0)

  def add(self, kind: str, seconds: float) -> None:
    self.seconds[kind] += seconds

  def timed(self, kind: str):
    """Context manager adding the block's wall time to `kind`."""
    import contextlib

    @contextlib.contextmanager
    def block():
      t0 = self._clock()
      try:
        yield
      finally:
        self.seconds[kind] += self._clock() - t0

    return block()

  def totals(self) -> dict[str, float]:
    """Seconds per kind, `other` and `total` included."""
    total = self._clock() - self._start
    out = dict(self.seconds)
    out["other"] = max(total - sum(self.seconds.values()), 0.0)
    out["total"] = total
    return out

  def format(self) -> str:
    t = self.totals()
    total = max(t["total"], 1e-9)
    parts = [f"{k} {t[k]:.1f} s ({t[k] / total:.1%})" for k in (*self.KINDS, "other") if t[k] > 0]
    return f"{t['total']:.1f} s: " + ", ".join(parts)
