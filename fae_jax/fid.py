"""The ADM evaluator's table for a sample batch: Inception Score, FID, sFID, precision, recall.

python -m fae_jax.fid --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
  --inception_dir=/tmp/inception

* `--samples`: an ADM sample batch (`arr_0` uint8 `[N, H, W, 3]`; 50K images for FID-50K).
* `--ref`: an ADM reference batch. Statistics `mu`, `sigma`, `mu_s`, `sigma_s` are used when
  present (as the ADM evaluator does); otherwise they are computed from its `arr_0` images.
  Precision and recall need the reference images (`arr_0`); a statistics-only file prints them
  as n/a.
* `--inception_dir`: the converted FID Inception
  (`python -m fae_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth --out=DIR`).

Numbers follow the ADM evaluator (`evaluations/evaluator.py` of openai/guided-diffusion): the TF
Inception graph, IS over splits of 5000 on the unbiased logits, precision/recall with k = 3 on
pool3 (reference = real). Runs on this host's devices; see `fae_jax.evaluation.generative`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from etils import epath

from fae_jax.evaluation import adm_npz, generative

_SAMPLES = flags.DEFINE_string("samples", None, "Sample batch .npz (arr_0: uint8 [N, H, W, 3]).")
_REF = flags.DEFINE_string(
  "ref", None, "Reference batch .npz (mu/sigma/mu_s/sigma_s and/or arr_0)."
)
_INCEPTION = flags.DEFINE_string("inception_dir", None, "Converted FID Inception directory.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per Inception call (all local devices).")
_BLOCK = flags.DEFINE_integer(
  "block_size", generative.DEFAULT_BLOCK, "Rows/columns per precision-recall distance tile."
)

ROWS = ("Inception Score", "FID", "sFID", "Precision", "Recall")
# `generative.adm_metrics` keys of the rows.
METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")


def evaluate_batches(
  samples: str | os.PathLike,
  ref: str | os.PathLike,
  inception_dir: str | os.PathLike,
  *,
  batch_size: int = 64,
  block_size: int = generative.DEFAULT_BLOCK,
) -> dict[str, float | None]:
  """The ADM table as `{row name: value}`; precision/recall are None without reference images.

  Raises:
    FileNotFoundError: a missing file or Inception export, named.
    KeyError: a sample batch without `arr_0`, or a reference without statistics or images.
  """
  for flag, path in (("--samples", samples), ("--ref", ref)):
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"{flag}={path} does not exist.")
  from fae_jax.convert.inception import load_inception
  from fae_jax.evaluation.inception_features import inception_feature_fn

  sample_shape = adm_npz.image_shape(samples)  # fails early, naming arr_0, if absent
  ref_keys = set(adm_npz.keys(ref))
  if not (set(adm_npz.STATS_KEYS) <= ref_keys or adm_npz.IMAGES_KEY in ref_keys):
    raise KeyError(  # before the Inception loads
      f"--ref={ref} has neither the statistics {list(adm_npz.STATS_KEYS)} nor images "
      f"'{adm_npz.IMAGES_KEY}' (it has {sorted(ref_keys)}); pass an ADM reference batch."
    )

  params, _ = load_inception(inception_dir)
  features = inception_feature_fn(params, batch_size)
  start = time.time()
  sample_acts = adm_npz.batch_activations(samples, features, batch_size)
  logging.info("Inception over %s %s: %.1f s", samples, sample_shape, time.time() - start)
  ref_stats, ref_acts = adm_npz.load_reference(ref, features, batch_size)
  metrics = generative.adm_metrics(
    sample_acts,
    ref_stats,
    None if ref_acts is None else ref_acts["pool3"],
    block_size=block_size,
  )
  return {row: metrics[key] for row, key in zip(ROWS, METRIC_KEYS, strict=True)}


def format_table(table: dict[str, float | None]) -> str:
  """`Name: value` lines in the ADM evaluator's order and wording."""
  lines = []
  for name in ROWS:
    value = table[name]
    lines.append(f"{name}: {'n/a (the reference has no images)' if value is None else value}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  missing = [f"--{f.name}" for f in (_SAMPLES, _REF, _INCEPTION) if not f.value]
  if missing:
    raise app.UsageError(
      f"Missing {', '.join(missing)}. Usage: python -m fae_jax.fid --samples=S.npz "
      "--ref=R.npz --inception_dir=DIR"
    )
  table = evaluate_batches(
    _SAMPLES.value,
    _REF.value,
    _INCEPTION.value,
    batch_size=_BATCH.value,
    block_size=_BLOCK.value,
  )
  print(format_table(table))


if __name__ == "__main__":
  app.run(main)
