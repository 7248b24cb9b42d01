"""The loop's metric log: `<stage>/train_log.jsonl`, one JSON object per logged step.

A log that needs no TensorBoard to read; stages and sweeps summarise loss curves from it.
Process 0 writes it. On local disk lines are appended; on an object store (`gs://`, where an
object cannot be appended to) the whole log is rewritten as one object per write (logging is
every `log_every` steps, so the log stays small), continuing a log left by an earlier run.
"""

from __future__ import annotations

import json

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
