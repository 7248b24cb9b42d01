"""The demo's train steps: steps/s, examples/s and MFU, optionally side by side with another commit.

  python benchmarks/demo_steps.py                       # this checkout, every demo train step
  python benchmarks/demo_steps.py --baseline=HEAD~1     # and a commit, interleaved in one run
  python benchmarks/demo_steps.py --steps=fae,diffusion --iters=20 --config=configs/demo.py

Each step is the train loop's own jitted step (`fae_jax.aot.build_step`: the same loss, optimizer,
EMA and shardings as the stage), at the config's batch size, on this host's devices, with random
parameters and inputs (the time of a dense step does not depend on the values). MFU = the stage's
analytic train FLOPs (3x the forward matmul FLOPs, the convention of the train loop's
`perf/mfu`) / median step time / the float32 matmul peak measured in the same process
(`--peak-n`^3 matmul, best of 5).

Beside MFU each row prints the step's "shape ceiling": the throughput of a matmul with the
step's typical shape (`[batch x tokens, width] @ [width, width]`), measured the same way. A small
model's matmuls cannot run faster than that on this CPU, whatever the rest of the step does, so
a step at 30% MFU whose shape ceiling is 35% is bounded by its shapes, not by overheads.

The last columns split the step: every `dot` of the compiled step (its optimized HLO) is run
alone at its own shapes, dimension numbers and dtypes, and the times are summed ("dots alone").
Their share of the step is the matmul part; the rest is everything else the step does (norms,
activations, softmax, attention's reshapes, the loss, AdamW and the EMA). "MFU if only the dots
ran" = analytic FLOPs / dots-alone time / peak: the MFU of this step with every non-matmul op
free, so a step whose value is below 50% cannot reach 50% with these shapes on this CPU, and the
gap between it and the MFU is what the non-matmul work costs. (The step's own dots may be faster,
fused with a neighbour, or slower, on a transposed layout, than alone; and a dot inside a
`while` loop counts once: the JSON row's `while_loops` says how many loops the HLO has.)

`--baseline=REV` checks REV out into a temporary git worktree and runs this same script there
(its `fae_jax`), alternating one step at a time between the two checkouts so both see the same
machine load; it prints the ratio per step. Each child process sets up host memory as its
checkout's `python -m fae_jax.main` does (`fae_jax.host_memory`; glibc's defaults for a commit
older than it, or with `FAE_JAX_HOST_MALLOC=system`), and the JSON rows say which. The figures of one run compare; absolute times of
different runs do not (the machine's speed varies up to 2x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_STEPS = ("fae", "pixel", "pixel_finetune", "diffusion", "flow")

if "--child" in sys.argv:
  # Each step measured as its checkout's train loop runs it: with that checkout's host-memory
  # set-up (`fae_jax.host_memory`: huge pages for XLA's per-step temporaries on a CPU host); a
  # checkout older than that module runs with glibc's defaults, as its train loop did.
  try:
    from fae_jax import host_memory
  except ImportError:
    host_memory = None
  if host_memory is not None:
    host_memory.reexec_with_huge_pages()


def _time(fn, iters: int) -> float:
  fn()  # compile + warm-up
  fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _matmul_rate(m: int, k: int, n: int, iters: int = 5) -> float:
  """FLOP/s of a jitted float32 `[m, k] @ [k, n]` (best of `iters`)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  return 2.0 * m * k * n / _best_seconds(jax.jit(lambda x, y: x @ y), a, b, iters)


def _best_seconds(f, a, b, iters: int) -> float:
  """Best-of-`iters` seconds of `f(a, b)` after one warm-up call."""
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return best


def _concrete(tree, seed: int):
  """Random arrays for abstract arguments: floats N(0, 0.02) (optimizer state zeros), ints 0."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    dtype = jnp.dtype(leaf.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and "opt_state" not in name:
      value = (0.02 * rng.standard_normal(leaf.shape)).astype(dtype)
      if name.endswith("['scale']"):
        value = np.ones(leaf.shape, dtype)
      if "std" in name:
        value = np.abs(value) + 1.0
    elif dtype == jnp.uint8:
      value = rng.integers(0, 256, leaf.shape, dtype=np.uint8)
    else:
      value = np.zeros(leaf.shape, dtype)
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(make, tree)


def _time_train_step(spec, iters: int) -> float:
  """Median seconds of `spec`'s train step, its (donated) state fed back each call."""
  import jax

  state, batch, extra = _concrete(spec.args, seed=0)
  holder = {"state": state}

  def run():
    new_state, metrics = spec.fn(holder["state"], batch, extra)
    jax.block_until_ready(metrics)
    holder["state"] = new_state

  return _time(run, iters)


def _tokens_per_example(config) -> int:
  """Tokens per example: the encoder's patch grid (`S/14` at 112 px: 8 x 8), which the FAE and
  the pixel decoder see and which the latent grid of the generators keeps."""
  patch = int(str(config.encoder.variant).split("/")[1])
  return (int(config.encoder.image_size) // patch) ** 2


def _shape_ceiling(name: str, config, tokens: int) -> tuple[tuple[int, int, int], str]:
  """The step's typical matmul `(m, k, n)` and what it is; `tokens` per example (the encoder's
  grid for the FAE and the pixel decoder, the latent grid for the generators: both 8 x 8 in the
  demo)."""
  if name == "fae":
    t = config.fae.train.batch_size * tokens
    w = config.fae.model.decoder_width
    return (t, w, w), f"feature decoder [{t}x{w}]@[{w}x{w}]"
  if name.startswith("pixel"):
    phase = config.pixel.noisy if name == "pixel" else config.pixel.finetune
    t, w = phase.train.batch_size * tokens, config.pixel.model.width
    return (t, w, w), f"pixel ViT [{t}x{w}]@[{w}x{w}]"
  if name == "diffusion":
    t, w = config.diffusion.train.batch_size * tokens, config.diffusion.model.width
    return (t, w, w), f"DiT [{t}x{w}]@[{w}x{w}]"
  if name == "flow":
    t, w = config.flow.train.batch_size * tokens, config.flow.model.width
    return (t, w, w), f"TarFlow [{t}x{w}]@[{w}x{w}]"
  raise ValueError(name)


_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_HLO_DOT = re.compile(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)(.*)$")
_HLO_DIMS = re.compile(r"(lhs|rhs)_(batch|contracting)_dims=\{([\d,]*)\}")


def hlo_dots(hlo_text: str) -> list[dict]:
  """Every `dot` of an optimized HLO module (`compiled.as_text()`): operand and output shapes,
  dtypes, dimension numbers and FLOPs (2 x output elements x contracted size). A dot inside a
  `while` body is listed once, whatever its trip count."""
  shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
  lines = hlo_text.splitlines()
  for line in lines:
    m = _HLO_VALUE.match(line)
    if m:
      dims = tuple(int(d) for d in m.group(3).split(",") if d)
      shapes[m.group(1)] = (m.group(2), dims)
  dots = []
  for line in lines:
    value, dot = _HLO_VALUE.match(line), _HLO_DOT.search(line)
    if not (value and dot):
      continue
    dims = {"lhs_batch": (), "rhs_batch": (), "lhs_contracting": (), "rhs_contracting": ()}
    for side, kind, axes in _HLO_DIMS.findall(dot.group(3)):
      dims[f"{side}_{kind}"] = tuple(int(a) for a in axes.split(",") if a)
    (lhs_dtype, lhs), (rhs_dtype, rhs) = shapes[dot.group(1)], shapes[dot.group(2)]
    out_dtype, out = shapes[value.group(1)]
    contracted = math.prod(lhs[axis] for axis in dims["lhs_contracting"])
    dots.append(
      {
        "lhs": lhs,
        "rhs": rhs,
        "dtypes": (lhs_dtype, rhs_dtype, out_dtype),
        "dims": dims,
        "flops": 2 * math.prod(out) * contracted,
      }
    )
  return dots


_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}


def _dot_seconds(dot: dict, iters: int = 5) -> float:
  """Best-of-`iters` seconds of one `dot` of `hlo_dots` run alone (jitted, row-major)."""
  import jax
  import jax.numpy as jnp

  lhs_t, rhs_t, out_t = (jnp.dtype(_HLO_DTYPES[t]) for t in dot["dtypes"])
  d = dot["dims"]
  numbers = ((d["lhs_contracting"], d["rhs_contracting"]), (d["lhs_batch"], d["rhs_batch"]))
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers, preferred_element_type=out_t))
  a = jax.random.normal(jax.random.key(0), dot["lhs"], jnp.float32).astype(lhs_t)
  b = jax.random.normal(jax.random.key(1), dot["rhs"], jnp.float32).astype(rhs_t)
  return _best_seconds(f, a, b, iters)


def dot_breakdown(spec) -> dict:
  """The step's dots timed one by one at their own shapes: how much of the step is matmul.

  Returns the HLO's dot FLOPs, the summed seconds of its dots run alone (each distinct dot timed
  once, multiplied by its count) and the number of dots."""
  hlo = spec.fn.lower(*spec.args).compile().as_text()
  dots = hlo_dots(hlo)
  distinct: dict[tuple, list] = {}  # same shapes, dtypes and dimension numbers -> [dot, count]
  for x in dots:
    key = (x["lhs"], x["rhs"], x["dtypes"], tuple(x["dims"].values()))
    distinct.setdefault(key, [x, 0])[1] += 1
  seconds = sum(count * _dot_seconds(x) for x, count in distinct.values())
  return {
    "hlo_dot_flops": float(sum(x["flops"] for x in dots)),
    "dots_alone_s": seconds,
    "num_dots": len(dots),
    "while_loops": hlo.count(" while("),
  }


def measure(config_path: str, steps: list[str], iters: int, peak_n: int) -> list[dict]:
  """Times each step of `steps` in this process; returns one dict per step."""
  import jax
  import ml_collections  # noqa: F401
  from ml_collections import config_flags  # noqa: F401

  from fae_jax import aot, sharding

  config = _load_config(config_path)
  mesh = sharding.make_mesh(-1, 1, jax.devices())
  peak = _matmul_rate(peak_n, peak_n, peak_n)
  tokens = _tokens_per_example(config)
  out = []
  for name in steps:
    spec = aot.build_step(name, config, mesh)
    seconds = _time_train_step(spec, iters)
    (m, k, n), what = _shape_ceiling(name, config, tokens)
    ceiling = _matmul_rate(m, k, n)
    flops = spec.analytic_flops
    dots = dot_breakdown(spec)
    out.append(
      {
        "step": name,
        "batch": spec.global_batch,
        "params_M": round(spec.num_params / 1e6, 3),
        "step_ms": round(seconds * 1e3, 2),
        "steps_per_s": round(1 / seconds, 2),
        "examples_per_s": round(spec.global_batch / seconds, 1),
        "gflop_per_step": round(flops / 1e9, 2),
        "gflop_per_s": round(flops / seconds / 1e9, 1),
        "peak_gflop_per_s": round(peak / 1e9, 1),
        "mfu": round(flops / seconds / peak, 3),
        "shape": what,
        "shape_ceiling": round(ceiling / peak, 3),
        "hlo_dot_gflop": round(dots["hlo_dot_flops"] / 1e9, 2),
        "num_dots": dots["num_dots"],
        "while_loops": dots["while_loops"],
        "dots_alone_ms": round(dots["dots_alone_s"] * 1e3, 2),
        "dot_share": round(dots["dots_alone_s"] / seconds, 3),
        "mfu_if_only_dots": round(flops / dots["dots_alone_s"] / peak, 3),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      }
    )
  return out


def _load_config(path: str):
  """`configs/demo.py[:args]` -> its ConfigDict (the same parsing as `--config=`)."""
  import importlib.util

  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", file)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(pathlib.Path(file).resolve().parents[1]))
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _child(checkout: pathlib.Path, args, step: str) -> dict:
  """One step measured by this script in a fresh process importing `checkout`'s fae_jax."""
  env = {**os.environ, "PYTHONPATH": str(checkout)}
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).resolve()),
    "--child",
    f"--config={checkout / args.config}",
    f"--steps={step}",
    f"--iters={args.iters}",
    f"--peak-n={args.peak_n}",
  ]
  result = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"{checkout}: step {step} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])[0]


def _table(rows: list[dict], baseline: dict[str, dict] | None) -> str:
  cols = ["step", "batch", "ms/step", "steps/s", "examples/s", "GFLOP/s", "MFU", "shape ceiling"]
  cols += ["dots alone: ms (share of step)", "MFU if only the dots ran"]
  if baseline:
    cols += ["baseline ms/step", "baseline MFU", "speed-up"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [
      r["step"],
      str(r["batch"]),
      f"{r['step_ms']:.1f}",
      f"{r['steps_per_s']:.2f}",
      f"{r['examples_per_s']:.0f}",
      f"{r['gflop_per_s']:.1f}",
      f"{r['mfu']:.1%}",
      f"{r['shape_ceiling']:.1%} ({r['shape']})",
      f"{r['dots_alone_ms']:.1f} ({r['dot_share']:.0%}, {r['num_dots']} dots)",
      f"{r['mfu_if_only_dots']:.1%}",
    ]
    if baseline:
      b = baseline[r["step"]]
      cells += [f"{b['step_ms']:.1f}", f"{b['mfu']:.1%}", f"{b['step_ms'] / r['step_ms']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--steps", default=",".join(DEFAULT_STEPS))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--peak-n", type=int, default=2048)
  parser.add_argument("--baseline", default="", help="a git revision to compare with")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  if args.child:
    print(json.dumps(measure(args.config, steps, args.iters, args.peak_n)))
    return

  if not args.baseline:
    rows = [_child(REPO, args, s) for s in steps]
    print(json.dumps(rows, indent=1))
    print(_table(rows, None))
    print(f"GLIBC_TUNABLES: {rows[0].get('glibc_tunables') or '(none)'}")
    return
  with tempfile.TemporaryDirectory(prefix="demo_steps_") as tmp:
    worktree = pathlib.Path(tmp) / "baseline"
    subprocess.run(
      ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
      cwd=REPO,
      check=True,
      capture_output=True,
    )
    try:
      rows, base = [], {}
      for s in steps:  # alternate, so both checkouts see the same load
        base[s] = _child(worktree, args, s)
        rows.append(_child(REPO, args, s))
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO)
  print(json.dumps({"current": rows, "baseline": base}, indent=1))
  print(f"baseline: {args.baseline}")
  print(_table(rows, base))
  for what, r in (("this checkout", rows[0]), ("baseline", next(iter(base.values())))):
    print(f"GLIBC_TUNABLES of {what}: {r.get('glibc_tunables') or '(none)'}")


if __name__ == "__main__":
  main()
