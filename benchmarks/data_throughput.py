"""Feature-cache read throughput of one host, against what a training step needs.

  python benchmarks/data_throughput.py                                  # the ImageNet record
  python benchmarks/data_throughput.py --cache=runs/demo/features       # an existing cache
  python benchmarks/data_throughput.py --tokens=256 --dim=1536 --step_time=0.5 \\
      --global_batch=1024 --hosts=16 --threads=16

Without `--cache`, writes a synthetic cache of `--examples` records shaped like the ImageNet
feature cache (256 x 1536 bfloat16 tokens + label + id = 786 KB a record) in a temporary
directory on local disk, then reads it through the training pipeline
(`pipeline.make_cache_dataset`: shuffled, batched, the `global` process split) and prints
examples/s and MB/s, beside the rate one host needs to keep a step of `--step_time` seconds fed:
`global_batch / hosts` records per step. The first pass reads from disk, the second mostly from
the page cache when the cache fits in memory: both are printed. Reading is random access (one
seek per record), which is what a shuffled epoch does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fae_jax.data import array_cache, pipeline  # noqa: E402


def write_synthetic_cache(directory: str, examples: int, tokens: int, dim: int, per_shard: int):
  spec = {"features": ((tokens, dim), "bfloat16"), "label": ((), "int32"), "id": ((), "int64")}
  writer = array_cache.CacheWriter(
    directory, spec, total=examples, examples_per_shard=per_shard, metadata={"synthetic": True}
  )
  rng = np.random.default_rng(0)
  block = rng.standard_normal((per_shard, tokens, dim), dtype=np.float32).astype("bfloat16")
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    ids = np.arange(start, end)
    writer.write_shard(
      shard,
      {
        "features": block[: end - start],
        "label": (ids % 1000).astype(np.int32),
        "id": ids.astype(np.int64),
      },
    )
  writer.finalize()


def read_rate(source, batch: int, batches: int, threads: int, prefetch: int) -> tuple[float, int]:
  data = ml_collections.ConfigDict(
    {"read_threads": threads, "prefetch_buffer_size": prefetch, "process_split": "global"}
  )
  ds = pipeline.make_cache_dataset(
    source, batch_size=batch, seed=0, process_index=0, process_count=1, data_config=data
  )
  it = iter(ds)
  next(it)  # pipeline start-up (threads, first reads) is not counted
  start = time.perf_counter()
  nbytes = 0
  for _ in range(batches):
    b = next(it)
    nbytes += sum(v.nbytes for v in b.values())
  return time.perf_counter() - start, nbytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cache", default=None, help="an existing cache directory (else synthetic)")
  parser.add_argument("--examples", type=int, default=2048)
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--dim", type=int, default=1536)
  parser.add_argument("--per_shard", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64, help="per-host batch read at a time")
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--threads", type=int, default=8, help="config.data.read_threads")
  parser.add_argument("--prefetch", type=int, default=128, help="data.prefetch_buffer_size")
  parser.add_argument("--step_time", type=float, default=0.5, help="seconds per training step")
  parser.add_argument("--global_batch", type=int, default=1024)
  parser.add_argument("--hosts", type=int, default=16, help="hosts sharing the global batch")
  args = parser.parse_args()

  tmp = None
  if args.cache is None:
    tmp = tempfile.mkdtemp(prefix="fae_data_bench_")
    directory = os.path.join(tmp, "features")
    t = time.perf_counter()
    write_synthetic_cache(directory, args.examples, args.tokens, args.dim, args.per_shard)
    print(
      f"wrote {args.examples} synthetic records in {time.perf_counter() - t:.1f} s: {directory}"
    )
  else:
    directory = args.cache
  try:
    source = array_cache.CacheSource(directory, stage="benchmark")
    record = source.manifest["record_bytes"]
    print(
      f"cache: {len(source)} records of {record / 1e3:.1f} KB in {len(source.shards)} shards; "
      f"read threads {args.threads}, prefetch {args.prefetch}, batch {args.batch}"
    )
    need_examples = args.global_batch / args.hosts / args.step_time
    need_mb = need_examples * record / 1e6
    print(
      f"needed per host: {args.global_batch} / {args.hosts} hosts every {args.step_time} s = "
      f"{need_examples:,.0f} examples/s = {need_mb:,.1f} MB/s"
    )
    for name in ("first pass", "second pass"):
      seconds, nbytes = read_rate(source, args.batch, args.batches, args.threads, args.prefetch)
      examples = args.batch * args.batches / seconds
      mb = nbytes / seconds / 1e6
      print(
        f"{name}: {examples:,.0f} examples/s, {mb:,.1f} MB/s "
        f"({examples / need_examples:.2f}x what one host needs)"
      )
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
