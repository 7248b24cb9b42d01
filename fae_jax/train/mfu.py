"""Peak FLOP/s of a device, for model-FLOPs utilisation (MFU).

Accelerators: a table of vendor peak DENSE bfloat16 matmul FLOP/s per chip (no structured
sparsity). Anything else (CPU, an accelerator not in the table) is measured once per process with
a large jitted matmul (float32 on CPU, bfloat16 elsewhere) and the source string says so. CPU
"devices" created with `--xla_force_host_platform_device_count` share one host, so the measured
host throughput is divided among them.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from fae_jax import tpu_chips

# GPUs: (substring of `device.device_kind`, lower case) -> peak dense bf16 FLOP/s per chip. Checked
# in order, so more specific names come first. TPUs come from `fae_jax.tpu_chips` (one table for
# the MFU here and the ahead-of-time roofline of `fae_jax.aot`).
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
  ("h200", 989e12, "NVIDIA H200 (same tensor cores as H100 SXM)"),
  ("h100 pcie", 756e12, "NVIDIA H100 PCIe"),
  ("h100", 989e12, "NVIDIA H100 SXM"),
  ("a100", 312e12, "NVIDIA A100"),
)


@functools.cache
def _measured_flops(platform: str, device_kind: str, n: int) -> float:
  """Best-of-5 throughput of an `[n, n] @ [n, n]` matmul on the first device of that kind."""
  device = next(d for d in jax.devices(platform) if d.device_kind == device_kind)
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()  # compile
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the number comes from.

  Returns:
    `(flops_per_second, source)`, e.g. `(989e12, "table: NVIDIA H100 SXM, dense bf16")` or
    `(4.1e10, "measured: float32 1024^3 matmul on cpu, host shared by 8 devices")`.
  """
  device = device or jax.local_devices()[0]
  kind = device.device_kind.lower()
  chip = tpu_chips.chip_for_device_kind(kind) if device.platform == "tpu" else None
  if chip is not None:
    return chip.peak_bf16_flops, f"table: TPU {chip.name}, dense bf16 ({chip.source})"
  if device.platform in ("gpu", "cuda", "rocm"):
    for key, flops, name in PEAK_BF16_FLOPS:
      if key in kind:
        return flops, f"table: {name}, dense bf16"
  if device.platform == "cpu":
    n = 1024
    shared = sum(1 for d in jax.local_devices() if d.platform == "cpu")
    flops = _measured_flops("cpu", device.device_kind, n) / shared
    return flops, f"measured: float32 {n}^3 matmul on cpu, host shared by {shared} devices"
  n = 8192
  flops = _measured_flops(device.platform, device.device_kind, n)
  return flops, f"measured: bfloat16 {n}^3 matmul on {device.device_kind} (not in the table)"
