"""Compiling one step for a TPU slice and reading the executable: memory, FLOPs, collectives.

The compiler half of `python -m fae_jax.aot` (which builds the stages' steps): `topology_devices`
describes an unattached slice through libtpu, `compile_step` lowers and compiles a `StepSpec`
with abstract inputs and returns a `StepReport` (XLA's memory and cost analyses, the collectives
of the optimized HLO, the roofline from `fae_jax.tpu_chips`), and `format_table` prints reports
as the README's table. Nothing here knows a stage.
"""

from __future__ import annotations

import os

# libtpu takes a process lock; the AOT compiler needs no TPU, so several processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from fae_jax import tpu_chips  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Topology and compilation.
# ----------------------------------------------------------------------------------------------


def libtpu_available() -> bool:
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU slice such as 'v5p:4x4x4' (nothing attached; for compilation only)."""
  if not libtpu_available():
    raise RuntimeError(
      "fae_jax.aot needs libtpu for the TPU compiler: pip install -e '.[test]' (it pins "
      "libtpu==0.0.42.1, the version jax[tpu]==0.10.2 uses)."
    )
  tpu_chips.chip_by_name(topology)  # a clear error for an unknown generation
  from jax.experimental import topologies

  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def _array_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]", shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def _top_level(shape: str) -> list[str]:
  """Top-level elements of a tuple shape `(a, (b, c))` -> ['a', '(b, c)']; a non-tuple -> [it]."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        parts.append(shape[start:i])
    elif ch == "," and depth == 1:
      parts.append(shape[start:i])
      start = i + 1
  return [p.strip() for p in parts if p.strip()]


_COLLECTIVE_RE = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>"
  + "|".join(COLLECTIVES)
  + r")(?P<start>-start)?\("
)


def hlo_collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """`{kind: (count, bytes per device)}` of the collectives in an optimized (per-device) HLO.

  An async `*-start` op counts once (its `*-done` is skipped); its bytes are the result's:
  for all-gather and collective-permute the output half of the `(operands, outputs)` tuple.
  Ops inside a while-loop body count once.
  """
  found: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_RE.match(line)
    if not m:
      continue
    op, shape = m["op"], m["shape"]
    if m["start"] and op in ("all-gather", "collective-permute"):
      elements = _top_level(shape)
      shape = elements[1] if len(elements) > 1 else elements[0]
    entry = found.setdefault(op, [0, 0])
    entry[0] += 1
    entry[1] += _array_bytes(shape)
  return {k: (v[0], v[1]) for k, v in found.items()}


@dataclasses.dataclass
class StepSpec:
  """One step to compile.

  Attributes:
    name: report name ('fae', 'pixel', ...).
    fn: the jitted function (explicit shardings).
    args: abstract arguments (`jax.ShapeDtypeStruct`s with shardings).
    num_params: parameters the step trains (or, for inference, uses).
    global_batch: examples per call.
    analytic_flops: analytic FLOPs per call, whole slice (the MFU convention).
    images_per_call: images a call produces/consumes for images/s (sampler steps: a fraction).
    fix_keys: config keys the fit message names: {'train': 'fae.train', 'remat': ...}.
  """

  name: str
  fn: Any
  args: tuple[Any, ...]
  num_params: int
  global_batch: int
  analytic_flops: float
  images_per_call: float
  fix_keys: dict[str, str]


@dataclasses.dataclass
class StepReport:
  name: str
  num_params: int
  global_batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  xla_flops: float  # whole slice
  analytic_flops: float
  bytes_accessed: float  # per device
  collectives: dict[str, tuple[int, int]]
  roofline_s: float
  images_per_s: float
  compile_s: float
  fix_keys: dict[str, str]
  compile_error: str = ""  # set when XLA refused to compile (out of HBM): no executable

  @property
  def peak_bytes(self) -> int:
    """Bytes per device: arguments + outputs not aliased to them + temporaries + code."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return not self.compile_error and self.peak_bytes <= self.hbm_bytes

  def fix(self, mesh: Mesh) -> str:
    """What to change when the step does not fit (empty when it fits)."""
    if self.fits:
      return ""
    over = self.peak_bytes / self.hbm_bytes
    fsdp, n = int(mesh.shape["fsdp"]), int(mesh.devices.size)
    if self.argument_bytes > 0.5 * self.hbm_bytes and fsdp < n:
      wider = min(n, fsdp * 2 ** int(np.ceil(np.log2(max(over * 1.3, 2.0)))))
      return (
        f"{self.name}: parameters/optimizer state take {self.argument_bytes / 2**30:.1f} GiB per "
        f"device: shard them over more devices with --config.mesh.fsdp={wider} (FSDP), or widen "
        f"the FSDP rule ({self.fix_keys.get('train', '<stage>.train')}.fsdp_rules / "
        "fsdp_min_size)."
      )
    train = self.fix_keys.get("train")
    k = 2 ** int(np.ceil(np.log2(max(over * 1.5, 2.0))))
    parts = []
    if "remat" in self.fix_keys:
      parts.append(f"--config.{self.fix_keys['remat']}=True (remat)")
    if train:
      parts.append(f"--config.{train}.grad_accum_steps={k} (accumulation)")
    parts.append(f"a global batch of {self.global_batch // k} (batch)")
    refused = " (XLA's TPU compiler refused the step: out of HBM)" if self.compile_error else ""
    return (
      f"{self.name}: activations take {self.temp_bytes / 2**30:.1f} GiB per device "
      f"({self.peak_bytes / 2**30:.1f} GiB > {self.hbm_bytes / 2**30:.0f} GiB HBM){refused}: set "
      + ", or ".join(parts)
      + "."
    )


_OOM_RE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _argument_shard_bytes(args: Any) -> int:
  """Bytes one device holds of the abstract arguments (from their shardings)."""
  total = 0
  for leaf in jax.tree.leaves(args):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _out_of_memory_report(
  spec: StepSpec, chip: tpu_chips.TpuChip, num_devices: int, error: Exception, compile_s: float
) -> StepReport:
  """The report of a step XLA's TPU compiler refused for lack of HBM.

  The compiler stops before it has an executable, so there is no memory or cost analysis: the
  temporaries come from its message, the arguments from the abstract inputs' shardings, and the
  roofline from the analytic FLOPs (compute-bound estimate).
  """
  m = _OOM_RE.search(str(error))
  temp = int(float(m[1]) * _UNITS[m[2]]) if m else 0
  roofline = spec.analytic_flops / (chip.peak_bf16_flops * num_devices)
  return StepReport(
    name=spec.name,
    num_params=spec.num_params,
    global_batch=spec.global_batch,
    argument_bytes=_argument_shard_bytes(spec.args),
    output_bytes=0,
    alias_bytes=0,
    temp_bytes=temp if m else chip.hbm_bytes,  # unknown, but over
    code_bytes=0,
    hbm_bytes=chip.hbm_bytes,
    xla_flops=float("nan"),
    analytic_flops=spec.analytic_flops,
    bytes_accessed=float("nan"),
    collectives={},
    roofline_s=roofline,
    images_per_s=spec.images_per_call / roofline if roofline > 0 else float("inf"),
    compile_s=compile_s,
    fix_keys=spec.fix_keys,
    compile_error=str(error).strip().splitlines()[0][:400],
  )


def compile_step(spec: StepSpec, chip: tpu_chips.TpuChip, num_devices: int) -> StepReport:
  """Lowers and compiles `spec` for the slice and reads XLA's memory, cost and HLO.

  A step that XLA's TPU compiler refuses for lack of HBM (`RESOURCE_EXHAUSTED`) is reported as
  not fitting (with `compile_error` set) instead of raising, so the table and the fix message
  still come out; any other compiler error propagates.
  """
  t0 = time.perf_counter()
  try:
    compiled = spec.fn.lower(*spec.args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _out_of_memory_report(spec, chip, num_devices, e, time.perf_counter() - t0)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0]
  flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  roofline = max(flops / chip.peak_bf16_flops, accessed / chip.hbm_bytes_per_s)
  return StepReport(
    name=spec.name,
    num_params=spec.num_params,
    global_batch=spec.global_batch,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    code_bytes=int(mem.generated_code_size_in_bytes),
    hbm_bytes=chip.hbm_bytes,
    xla_flops=flops * num_devices,
    analytic_flops=spec.analytic_flops,
    bytes_accessed=accessed,
    collectives=hlo_collectives(compiled.as_text()),
    roofline_s=roofline,
    images_per_s=spec.images_per_call / roofline if roofline > 0 else float("inf"),
    compile_s=compile_s,
    fix_keys=spec.fix_keys,
  )


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def _collectives_str(c: dict[str, tuple[int, int]]) -> str:
  if not c:
    return "none"
  return ", ".join(f"{k} x{n} ({b / 2**20:.0f} MiB)" for k, (n, b) in sorted(c.items()))


def format_table(reports: Sequence[StepReport], topology: str, mesh: Mesh) -> str:
  chip = tpu_chips.chip_by_name(topology)
  head = (
    f"{topology}: {mesh.devices.size} chips ({chip.name}: {chip.hbm_bytes / 2**30:.0f} GiB HBM, "
    f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s; "
    f"{chip.source}), mesh {dict(mesh.shape)}"
  )
  cols = (
    "step",
    "params",
    "batch",
    "args GiB",
    "out GiB",
    "temp GiB",
    "code GiB",
    "peak GiB/dev",
    "fits",
    "XLA TFLOP/step",
    "analytic TFLOP/step",
    "roofline ms",
    "img/s",
    "collectives (per device)",
  )
  rows = []
  for r in reports:
    rows.append(
      (
        r.name,
        f"{r.num_params / 1e6:.1f}M",
        str(r.global_batch),
        _gib(r.argument_bytes),
        _gib(r.output_bytes - r.alias_bytes),
        _gib(r.temp_bytes),
        _gib(r.code_bytes),
        f"{_gib(r.peak_bytes)} / {chip.hbm_bytes / 2**30:.0f}",
        "yes" if r.fits else "NO",
        "n/a (not compiled)" if r.compile_error else f"{r.xla_flops / 1e12:.1f}",
        f"{r.analytic_flops / 1e12:.1f}",
        f"{r.roofline_s * 1e3:.1f}",
        f"{r.images_per_s:.0f}",
        "n/a (not compiled)" if r.compile_error else _collectives_str(r.collectives),
      )
    )
  lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)
