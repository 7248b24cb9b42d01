"""Huge pages for XLA CPU's large host allocations (`fae_jax.host_memory`).

The decision (which hosts re-execute with the tunable), the effect (the page faults of a jitted
function with a large temporary, measured in fresh processes with and without it) and the entry
point (`python -m fae_jax.main` re-executes itself once and logs what it did).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fae_jax import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def capable_host(monkeypatch):
  """A host where huge pages apply: glibc >= 2.35, THP in madvise mode, jax on the CPU."""
  monkeypatch.setattr(host_memory, "_glibc_at_least", lambda major, minor: True)
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
  return {"JAX_PLATFORMS": "cpu"}


def test_capable_host_gets_the_tunable_added_to_its_own(capable_host):
  new, why = host_memory.huge_page_environ(capable_host)
  assert new["GLIBC_TUNABLES"] == host_memory.TUNABLE
  assert new["JAX_PLATFORMS"] == "cpu" and why == f"GLIBC_TUNABLES={host_memory.TUNABLE} is not set"
  mine = {**capable_host, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  new, _ = host_memory.huge_page_environ(mine)
  assert new["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
  # The re-executed process finds it set and stays; so does a user's own hugetlb choice.
  for tunables in (new["GLIBC_TUNABLES"], "glibc.malloc.hugetlb=0"):
    env = {**capable_host, "GLIBC_TUNABLES": tunables}
    assert host_memory.huge_page_environ(env) == (None, f"GLIBC_TUNABLES={tunables} is set")
  assert "2 MiB transparent huge pages" in host_memory.describe(
    {**capable_host, "GLIBC_TUNABLES": host_memory.TUNABLE}
  )
  assert "defaults (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 is set)" in host_memory.describe(
    {**capable_host, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  )
  assert "not re-executed" in host_memory.describe(capable_host)


@pytest.mark.parametrize(
  "change, why",
  [
    ({"FAE_JAX_HOST_MALLOC": "system"}, "FAE_JAX_HOST_MALLOC=system"),
    ({"FAE_JAX_HOST_MALLOC": " System "}, "FAE_JAX_HOST_MALLOC=system"),
    ({"JAX_PLATFORMS": "tpu"}, "jax runs on an accelerator"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "jax runs on an accelerator"),
  ],
)
def test_hosts_and_users_that_keep_glibc_defaults(capable_host, change, why):
  new, reason = host_memory.huge_page_environ({**capable_host, **change})
  assert new is None and reason == why
  assert host_memory.describe({**capable_host, **change}) == (
    f"Host memory: glibc's malloc defaults ({why})."
  )


def test_kernel_and_libc_that_cannot_or_need_not(capable_host, monkeypatch):
  for mode in ("always", "never", "unavailable"):
    monkeypatch.setattr(host_memory, "_thp_mode", lambda mode=mode: mode)
    assert host_memory.huge_page_environ(capable_host) == (
      None,
      f"transparent huge pages: {mode}",
    )
  monkeypatch.setattr(host_memory, "_glibc_at_least", lambda major, minor: False)
  assert host_memory.huge_page_environ(capable_host)[0] is None


def test_accelerator_device_nodes_mean_not_cpu(monkeypatch):
  monkeypatch.setattr(host_memory.glob, "glob", lambda p: ["/dev/accel0"] if "accel" in p else [])
  assert not host_memory.runs_on_cpu({})
  assert host_memory.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
  monkeypatch.setattr(host_memory.glob, "glob", lambda p: [])
  assert host_memory.runs_on_cpu({})


def test_bad_mode_names_the_variable_and_the_choices():
  with pytest.raises(ValueError, match=r"FAE_JAX_HOST_MALLOC='huge'.*'auto'.*'system'"):
    host_memory.huge_page_environ({"FAE_JAX_HOST_MALLOC": "huge"})


# A jitted function with two 96 MiB temporaries (sin(x), reversed cos(x)), allocated and freed
# per call.
_FAULTS = """
import json, resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x)[::-1]))
x = jnp.ones((24 * 2**20,), jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def _clean_environ(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


def _skip_unless_this_host_qualifies():
  new, why = host_memory.huge_page_environ(_clean_environ())
  if new is None:
    pytest.skip(f"huge pages do not apply on this host: {why}")


def test_huge_pages_remove_the_page_faults_of_large_temporaries():
  _skip_unless_this_host_qualifies()
  faults = {}
  for name, extra in (("default", {}), ("huge", {"GLIBC_TUNABLES": host_memory.TUNABLE})):
    out = subprocess.run(
      [sys.executable, "-c", _FAULTS], env=_clean_environ(**extra), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    faults[name] = json.loads(out.stdout.strip().splitlines()[-1])
  # 192 MiB in 4 KiB pages is 49,152 faults per call; in 2 MiB pages 96 (measured: 49,160 / 608).
  assert faults["default"] > 24_000, faults
  assert faults["huge"] * 10 < faults["default"], faults


def test_main_reexecutes_itself_once_with_the_tunable(tmp_path):
  _skip_unless_this_host_qualifies()
  cmd = [sys.executable, "-m", "fae_jax.main", "--config=configs/demo.py"]
  cmd += [f"--workdir={tmp_path}", "unexpected"]  # stops in main(), after its first log line
  for extra, expected in (
    ({}, f"Host memory: GLIBC_TUNABLES={host_memory.TUNABLE} is set: XLA CPU's"),
    ({host_memory.ENV: "system"}, "Host memory: glibc's malloc defaults (FAE_JAX_HOST_MALLOC=sys"),
  ):
    out = subprocess.run(cmd, cwd=REPO, env=_clean_environ(**extra), capture_output=True, text=True)
    assert out.returncode != 0 and "Unexpected arguments: ['unexpected']" in out.stderr, out.stderr
    assert expected in out.stderr, out.stderr[-2000:]
    assert out.stderr.count("Host memory:") == 1
