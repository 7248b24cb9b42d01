"""Per-chip figures of the Cloud TPU generations: HBM, peak bf16 FLOP/s, HBM bandwidth.

The one place these numbers live: the train loop's MFU (`fae_jax.train.mfu`) and the
ahead-of-time report (`fae_jax.aot`) read them from here. Figures per CHIP (a v4 or v5p chip has
two TensorCores that JAX shows as one device; v5e and v6e have one), dense bf16 (no sparsity),
from the Google Cloud TPU documentation's system-architecture pages:

  v4  https://cloud.google.com/tpu/docs/v4   32 GiB HBM2, 1,200 GB/s, 275 TFLOP/s bf16
  v5e https://cloud.google.com/tpu/docs/v5e  16 GiB HBM2, 819 GB/s, 197 TFLOP/s bf16
  v5p https://cloud.google.com/tpu/docs/v5p  95 GiB HBM2e, 2,765 GB/s, 459 TFLOP/s bf16
  v6e https://cloud.google.com/tpu/docs/v6e  32 GiB HBM, 1,640 GB/s, 918 TFLOP/s bf16
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation.

  Attributes:
    name: the topology prefix `jax.experimental.topologies` takes ('v5p' in 'v5p:4x4x4').
    device_kinds: `jax.Device.device_kind` strings of its chips, lower case.
    hbm_bytes: HBM per chip.
    peak_bf16_flops: peak dense bf16 matmul FLOP/s per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    source: where the figures come from.
  """

  name: str
  device_kinds: tuple[str, ...]
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  source: str


CHIPS: tuple[TpuChip, ...] = (
  TpuChip("v4", ("tpu v4",), 32 * GIB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
  TpuChip(
    "v5e",
    ("tpu v5 lite", "tpu v5e"),
    16 * GIB,
    197e12,
    819e9,
    "https://cloud.google.com/tpu/docs/v5e",
  ),
  TpuChip(
    "v5p", ("tpu v5", "tpu v5p"), 95 * GIB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"
  ),
  TpuChip(
    "v6e",
    ("tpu v6 lite", "tpu v6e"),
    32 * GIB,
    918e12,
    1640e9,
    "https://cloud.google.com/tpu/docs/v6e",
  ),
)


def chip_by_name(name: str) -> TpuChip:
  """'v5p' (or a topology 'v5p:4x4x4') -> its chip; fails naming the known generations."""
  prefix = name.split(":")[0].lower()
  for chip in CHIPS:
    if chip.name == prefix:
      return chip
  raise ValueError(
    f"Unknown TPU generation {prefix!r}; known: {[c.name for c in CHIPS]} (a topology is "
    "written like 'v5p:4x4x4', 'v5e:16x16', 'v6e:8x8')."
  )


def chip_for_device_kind(device_kind: str) -> TpuChip | None:
  """The chip of a `jax.Device.device_kind` ('TPU v5 lite' -> v5e), or None if not a known TPU."""
  kind = device_kind.lower().strip()
  for chip in CHIPS:
    if kind in chip.device_kinds:
      return chip
  return None
