"""Host memory for XLA's CPU backend: back large allocations with transparent huge pages.

XLA CPU allocates the temporaries of each execution as one block (`posix_memalign`; 278 MB for
the demo's FAE train step) and frees it when the execution ends. glibc's malloc serves a block
that large with a fresh `mmap` and returns it with `munmap`, so every step maps tens of thousands
of new 4 KiB pages, each a page fault in which the kernel zeroes the page: on a 2-core machine
about 71,000 faults and 180-230 ms of system time per FAE step (README, "Speed of the demo's
steps", finding 9). With glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) malloc asks the
kernel for transparent huge pages on those blocks (`madvise(MADV_HUGEPAGE)`): one fault per
2 MiB, 512x fewer.

Tunables are read when a process starts, so `python -m fae_jax.main` on a CPU host re-executes
itself once, first thing, with the tunable added to `GLIBC_TUNABLES`. It does so only where it
helps: Linux with glibc >= 2.35, transparent huge pages in `madvise` mode (in `always` mode the
kernel already uses them; in `never` it will not), and jax running on the CPU (`JAX_PLATFORMS`
starting with `cpu`, or no TPU/GPU device node on the host). `FAE_JAX_HOST_MALLOC=system` turns
it off. (Keeping freed memory in one malloc arena instead, via `mallopt`, removes the faults too
but serialises every thread's malloc on one lock: the demo's small pixel-decoder step ran
10-40% slower that way.)
"""

from __future__ import annotations

import glob
import os
import pathlib
import platform
import sys

ENV = "FAE_JAX_HOST_MALLOC"
MODES = ("auto", "system")
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

# Device nodes of the accelerators jax would pick over the CPU: TPU VMs (/dev/accel*, /dev/vfio)
# and NVIDIA GPUs.
_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether jax will pick its CPU backend: `JAX_PLATFORMS` names it first, or it is unset and
  the host has no TPU or GPU device node."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def _thp_mode() -> str:
  """The kernel's transparent-huge-page mode: the bracketed word of `[always] madvise never`."""
  try:
    text = pathlib.Path(_THP_MODE_FILE).read_text()
  except OSError:
    return "unavailable"
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else "unavailable"


def _glibc_at_least(major: int, minor: int) -> bool:
  name, version = platform.libc_ver()
  if name != "glibc" or not sys.platform.startswith("linux"):
    return False
  try:
    return tuple(int(x) for x in version.split(".")[:2]) >= (major, minor)
  except ValueError:
    return False


def huge_page_environ(environ=os.environ) -> tuple[dict[str, str] | None, str]:
  """`(environment to re-execute with, or None when this one stays; why, for the log)`."""
  mode = environ.get(ENV, "auto").strip().lower()
  if mode not in MODES:
    raise ValueError(
      f"{ENV}={mode!r} is not a host-memory mode: use 'auto' (transparent huge pages for large "
      "allocations when jax runs on the CPU) or 'system' (glibc's defaults)."
    )
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:
    return None, f"GLIBC_TUNABLES={tunables} is set"
  if mode == "system":
    return None, f"{ENV}=system"
  if not runs_on_cpu(environ):
    return None, "jax runs on an accelerator"
  if not _glibc_at_least(2, 35):
    return None, "huge-page malloc needs glibc >= 2.35"
  thp = _thp_mode()
  if thp != "madvise":
    return None, f"transparent huge pages: {thp}"
  new = dict(environ)
  new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  return new, f"GLIBC_TUNABLES={new['GLIBC_TUNABLES']} is not set"


def describe(environ=os.environ) -> str:
  """One line for the log: how this process's large host allocations are backed, and why."""
  new, why = huge_page_environ(environ)
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return (
      f"Host memory: {why}: XLA CPU's per-step temporaries come in 2 MiB transparent huge "
      f"pages, not faulted in 4 KiB at a time ({ENV}=system turns it off)."
    )
  if new is not None:
    return f"Host memory: glibc's malloc defaults ({why}: started in-process, not re-executed)."
  return f"Host memory: glibc's malloc defaults ({why})."


def reexec_with_huge_pages() -> None:
  """Replaces this process (same pid, arguments and environment, plus the tunable) when
  `huge_page_environ` asks for it; call first thing in an entry point, before threads start.
  Returns only when nothing needs to change."""
  environ, _ = huge_page_environ()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
