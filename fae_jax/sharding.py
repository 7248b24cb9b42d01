"""Device mesh, parameter sharding rules and global-batch assembly.

One mesh with axes `('data', 'fsdp')`. Batches are sharded over both axes. Parameters are
sharded over `fsdp` by regex rules from the config (big_vision style): a parameter whose path
matches a rule and whose size is above a threshold is split along its largest dimension divisible
by the `fsdp` axis size; everything else is replicated. With `fsdp = 1` this is pure data
parallelism; `data = 1` is pure FSDP (maxtext's preset).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp')` mesh; -1 on one axis means "all remaining devices".

  On TPU the devices are laid out by `mesh_utils.create_device_mesh`, which maps each mesh axis
  onto whole physical torus axes (e.g. on v5p:4x4x4, `fsdp` in {1, 4, 16, 64}). A shape that
  splits a physical axis (fsdp=8 on 4x4x4, fsdp=4 on v6e:8x8) is still built, with
  `allow_split_physical_axes=True` (a mesh axis then spans part of a torus ring: its collectives
  lose the wrap-around link), and a warning says which shapes keep whole axes. `devices` may be
  the devices of a `jax.experimental.topologies` description (ahead-of-time compilation).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data/fsdp may be -1.")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(
      f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices; set "
      "--config.mesh.data/--config.mesh.fsdp so that their product is the device count "
      "(-1 on one axis takes the rest)."
    )
  if len({d.platform for d in devices}) == 1 and devices[0].platform == "tpu":
    dev_array = _tpu_device_mesh((data, fsdp), devices)
  else:
    dev_array = np.asarray(devices).reshape(data, fsdp)
  return Mesh(dev_array, MESH_AXES)


def _tpu_device_mesh(shape: tuple[int, int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Topology-aware device order for `shape`; see `make_mesh` for axes that split the torus."""
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (NotImplementedError, ValueError, AssertionError) as whole_axes_error:
    try:
      dev_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError) as split_error:
      logging.warning(
        "mesh: no topology-aware layout for data=%d x fsdp=%d (%s); using the plain device "
        "order (collectives may be slower).",
        *shape,
        split_error,
      )
      return np.asarray(devices).reshape(shape)
    logging.warning(
      "mesh: data=%d x fsdp=%d splits a physical torus axis of this TPU slice (%s); built with "
      "allow_split_physical_axes. For the fastest collectives pick mesh.fsdp as a product of "
      "whole physical axis lengths.",
      *shape,
      str(whole_axes_error).split(".")[0],
    )
    return dev_array


def mesh_from_config(mesh_config) -> Mesh:
  return make_mesh(data=int(mesh_config.data), fsdp=int(mesh_config.fsdp))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
  "fae_jax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None) -> Iterator[None]:
  """While tracing inside this context, `constrain_batch` pins activations to `mesh`'s batch axes.

  Train steps trace their loss under it. Without a pin, XLA's SPMD partitioner is free to meet an
  FSDP-sharded weight by gathering the *activations* instead of the weight (the matmul then runs
  split over the weight's output features, and every layer's activations are all-gathered), which
  on STARFlow-1.4B over v5e-256 multiplied the per-chip temporaries and the all-gather traffic
  (README, "Checked for TPU from a CPU (AOT)"). maxtext pins activations the same way.
  """
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis sharded over every mesh axis, the other axes unsplit.

  A no-op outside `activation_sharding`, on a single device, or when the batch does not divide
  by the batch shards (e.g. a sampler's odd batch): numerics never change, only the placement.
  """
  mesh = _ACTIVATION_MESH.get()
  if mesh is None or mesh.devices.size == 1 or x.ndim == 0:
    return x
  if x.shape[0] % num_batch_shards(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def key_name(key: Any) -> str:
  """The name of one pytree path entry (`DictKey.key`, `GetAttrKey.name`, `SequenceKey.idx`)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path) -> str:
  return "/".join(key_name(k) for k in path)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Splits the largest dimension divisible by `fsdp_size`; replicated if none is."""
  if fsdp_size <= 1:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def param_partition_specs(
  abstract_params: Any, mesh: Mesh, rules: Sequence[str] = (".*",), min_size: int = 2**14
) -> Any:
  """Partition specs for a parameter pytree from regex rules.

  Args:
    abstract_params: pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the mesh; its `fsdp` axis size decides the split.
    rules: regexes matched (`re.search`) against `a/b/c` parameter paths; matching parameters
      with at least `min_size` elements are FSDP-sharded.
    min_size: smaller parameters (biases, norms) stay replicated.
  """
  fsdp_size = mesh.shape["fsdp"]
  compiled = [re.compile(r) for r in rules]

  def spec(path, leaf):
    name = _path_str(path)
    if np.prod(leaf.shape) >= min_size and any(r.search(name) for r in compiled):
      return fsdp_spec(leaf.shape, fsdp_size)
    return P()

  return jax.tree_util.tree_map_with_path(spec, abstract_params)


def param_shardings(
  abstract_params: Any, mesh: Mesh, rules: Sequence[str] = (".*",), min_size: int = 2**14
) -> Any:
  specs = param_partition_specs(abstract_params, mesh, rules, min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def log_sharding_table(shardings: Any, abstract_params: Any, title: str) -> None:
  lines = [f"{title}:"]
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), s in zip(flat, flat_s, strict=True):
    lines.append(f"  {_path_str(path):60s} {tuple(leaf.shape)!s:20s} {s.spec}")
  logging.info("\n".join(lines))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process host batches into global arrays sharded over the batch axes.

  Each process passes its own slice (leading dimension = global batch / process count).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str) -> None:
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(
      f"{what}: global batch {global_batch_size} is not divisible by the {shards} batch shards "
      f"of the mesh {dict(mesh.shape)}; pick a batch size that is a multiple of {shards}."
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"{what}: global batch {global_batch_size} is not divisible by the "
      f"{jax.process_count()} processes."
    )


def _path_key(path) -> tuple[tuple[str, str], ...]:
  return tuple((type(k).__name__, key_name(k)) for k in path)


def opt_state_shardings(
  abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings for an optax state: each parameter-shaped leaf gets its parameter's sharding.

  A state leaf belongs to parameter `p` when `p`'s tree path is a suffix of the leaf's path and
  the shapes agree (Adam's `mu`/`nu` hold `.../mu/<param path>`); everything else (counts,
  factored statistics) is replicated. Path matching instead of `optax.tree_map_params` because
  the latter cannot trace through `optax.masked` (the weight-decay mask).
  """
  is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(param_shardings, is_leaf=is_sharding)
  by_path = {
    _path_key(path): (tuple(leaf.shape), s)
    for (path, leaf), s in zip(flat_params, flat_shardings, strict=True)
  }
  replicated_sharding = replicated(mesh)

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated_sharding

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
