"""One process of a multi-process check; run by tests/test_multiprocess.py under the launcher.

  python -m fae_jax.multiprocess --num_processes=2 --devices_per_process=4 -- \
      python tests/multihost_worker.py collective|params_store [OUT_DIR]

Each check asserts on every process and prints `OK <check> <process>` at the end.
"""

import sys

from fae_jax import multihost

multihost.initialize("auto")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from fae_jax import params_store, sharding  # noqa: E402


def collective() -> None:
  assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  mine = full.reshape(2, 8, 3)[jax.process_index()]  # process i holds rows [8i, 8i + 8)
  x = sharding.global_batch(mine, mesh)
  assert not x.is_fully_addressable
  total = jax.jit(lambda a: a.sum(0), out_shardings=sharding.replicated(mesh))(x)
  np.testing.assert_array_equal(multihost.gather(total), full.sum(0))
  np.testing.assert_array_equal(multihost.gather(x), full)  # every host gets other hosts' rows
  # Only process 0's fn runs; every process gets its value.
  seen = multihost.decide_once("who", lambda: {"decider": jax.process_index(), "x": [1.5, None]})
  assert seen == {"decider": 0, "x": [1.5, None]}, seen
  # A failing decision reaches every process instead of leaving the others waiting.
  try:
    multihost.decide_once("fails", lambda: 1 // 0)
  except ZeroDivisionError:
    assert jax.process_index() == 0
  except RuntimeError as e:
    assert jax.process_index() == 1 and "ZeroDivisionError" in str(e), e
  else:
    raise AssertionError("decide_once must raise on every process")
  multihost.barrier("collective-end")


def save_load(out: epath.Path) -> None:
  mesh = sharding.make_mesh(data=2, fsdp=4)
  values = {
    "w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7,
    "b": np.linspace(-1, 1, 8).astype(np.float32),
  }
  specs = {"w": jax.sharding.PartitionSpec("fsdp", None), "b": jax.sharding.PartitionSpec()}
  shardings = {k: jax.sharding.NamedSharding(mesh, s) for k, s in specs.items()}
  params = {
    k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
    for k, v in values.items()
  }
  assert not params["w"].is_fully_addressable
  meta = params_store.save_params(out / "export", params, {"model": "toy"}, "model.json")
  assert meta["num_params"] == 64 * 8 + 8
  assert params_store.exists(out / "export", "model.json")
  restored = params_store.load_params(out / "export", shardings)
  assert restored["w"].sharding == shardings["w"]
  got = multihost.gather(restored)
  for k, v in values.items():
    np.testing.assert_array_equal(got[k], v)
  try:
    params_store.save_params(out / "export", params, {"model": "toy"}, "model.json")
  except FileExistsError:
    pass
  else:
    raise AssertionError("a second save into a complete directory must fail on every process")


if __name__ == "__main__":
  check = sys.argv[1]
  if check == "collective":
    collective()
  elif check == "params_store":
    save_load(epath.Path(sys.argv[2]))
  else:
    raise SystemExit(f"unknown check {check!r}")
  print(f"OK {check} {jax.process_index()}", flush=True)
