"""What issue 15's safety nets cost the demo, measured side by side with the work they guard.

  python benchmarks/robustness_overhead.py [--batch=64] [--shard=1000] [--iters=5]

One process, the demo's `encode` geometry (DINOv2-S/14 at 112 px, batch 64, 1,000 examples per
shard, float32; random weights: the cost does not depend on their values):

* the encoder forward of one batch (the work), against the NaN/Inf check of its outputs
  (`finite_check.bad_ids`, once per batch) and the shard checksum (`file_sha256` of a shard's
  bytes, once per shard when it is written and once when it is first read: counted twice here);
* a kill point with `FAE_JAX_KILL_AT` unset (`faults.point`, called a few times per train step or
  shard), per call.

Prints each cost and its fraction of the encode stage's time per shard; the train stages add only
the kill points (two per step) and the stage records (one small JSON per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from encoder_throughput import time_fn  # noqa: E402  (the script dir is on sys.path)

from fae_jax import faults  # noqa: E402
from fae_jax.convert.encoder import random_params  # noqa: E402
from fae_jax.data import cache_integrity, finite_check  # noqa: E402
from fae_jax.models.dinov2 import Dinov2, Dinov2Config  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=112)
  parser.add_argument("--shard", type=int, default=1000, help="examples per cache shard")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  os.environ.pop(faults.ENV, None)

  config = Dinov2Config.from_variant("S/14")
  params = random_params(config)
  model = Dinov2(config)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)["patch"])
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
  images = jax.device_put(images.astype(np.float32))
  outputs = {"patch": np.asarray(forward(params, images))}
  ids = np.arange(args.batch, dtype=np.int64)

  t_encode = time_fn(lambda: jax.device_get(forward(params, images)), args.iters)
  t_finite = time_fn(lambda: finite_check.bad_ids(outputs, ids), args.iters)
  batches_per_shard = args.shard / args.batch
  shard_bytes = outputs["patch"].nbytes * batches_per_shard
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "shard")
    with open(path, "wb") as f:
      f.write(np.random.default_rng(1).bytes(int(shard_bytes)))
    t_sha = time_fn(lambda: cache_integrity.file_sha256(path), args.iters)
  calls = 100_000
  t0 = time.perf_counter()
  for i in range(calls):
    faults.point("train:fae:step", i)
  t_point = (time.perf_counter() - t0) / calls

  shard_encode = t_encode * batches_per_shard
  shard_checks = t_finite * batches_per_shard + 2 * t_sha
  result = {
    "encode_batch_ms": round(1e3 * t_encode, 2),
    "finite_check_batch_ms": round(1e3 * t_finite, 3),
    "finite_check_over_encode": round(t_finite / t_encode, 4),
    "shard_mb": round(shard_bytes / 2**20, 1),
    "sha256_shard_ms": round(1e3 * t_sha, 1),
    "encode_shard_s": round(shard_encode, 2),
    "checks_per_shard_s": round(shard_checks, 3),
    "checks_over_encode": round(shard_checks / shard_encode, 4),
    "kill_point_unset_ns": round(1e9 * t_point, 1),
  }
  print(json.dumps(result, indent=2))
  print(
    f"encode: the NaN/Inf check and the checksums (written and verified) add "
    f"{100 * shard_checks / shard_encode:.2f}% to a shard ({shard_checks:.3f} s of "
    f"{shard_encode:.2f} s); a kill point costs {1e9 * t_point:.0f} ns per call."
  )


if __name__ == "__main__":
  main()
