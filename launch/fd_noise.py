"""How much of an FD-DINOv2 difference between sweep points is sampling noise.

  python launch/fd_noise.py runs/sweep/adapter_depth=1 [--resamples=100]

For each generator setting the `evaluate` stage sampled (`<run>/eval/<generator>_<setting>/`,
its shards hold the frozen encoder's pooled features `dinov2`), the FD against the held-out
images (`<run>/eval/held_out/`, `real`) is recomputed on bootstrap resamples of both sets (drawn
with replacement, same sizes): it prints the FD of the full sets and the standard deviation over
the resamples. Two points whose FDs differ by less than about twice that are not ranked by the
run (this measures the finite-sample noise of the metric only, not the spread over training
seeds).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from fae_jax.evaluation import frechet


def _features(directory: str, key: str) -> np.ndarray:
  files = sorted(glob.glob(os.path.join(directory, "samples-*.npz")))
  if not files:
    raise FileNotFoundError(f"{directory}: no samples-*.npz shards (run the evaluate stage).")
  return np.concatenate([np.load(f)[key] for f in files]).astype(np.float64)


def fd(a: np.ndarray, b: np.ndarray) -> float:
  return float(
    frechet.frechet_distance(
      frechet.FeatureStats.from_features(a), frechet.FeatureStats.from_features(b)
    )
  )


def bootstrap(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(resamples):
    r = real[rng.integers(0, len(real), len(real))]
    f = fake[rng.integers(0, len(fake), len(fake))]
    out.append(fd(r, f))
  return np.asarray(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="a workdir whose evaluate stage finished")
  parser.add_argument("--resamples", type=int, default=100)
  args = parser.parse_args()
  eval_dir = os.path.join(args.run, "eval")
  real = _features(os.path.join(eval_dir, "held_out"), "real")
  print(f"{args.run}: {len(real)} held-out images")
  print("| setting | FD-DINOv2 | bootstrap std |")
  print("|---|---|---|")
  for directory in sorted(glob.glob(os.path.join(eval_dir, "*_*/"))):
    name = os.path.basename(os.path.normpath(directory))
    if name == "held_out":
      continue
    fake = _features(directory, "dinov2")
    spread = bootstrap(real, fake, args.resamples)
    print(f"| {name} | {fd(real, fake):.2f} | {spread.std():.2f} |")


if __name__ == "__main__":
  main()
