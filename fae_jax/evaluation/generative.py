"""Sample-quality metrics of the ADM evaluator: FID, sFID, Inception Score, precision, recall.

What each metric takes (features from `fae_jax.models.inception.FIDInceptionV3`, though any
feature space works; the demo uses DINOv2):

* FID / sFID: Frechet distance between Gaussian fits of `pool3` `[N, 2048]` / `spatial`
  `[N, 2023]` features (`fid`), statistics and distance in float64 (`frechet.py`).
* Inception Score: `exp(E_x KL(p(y|x) || p(y)))` from the 1008 *unbiased* logits, per split of
  5000 consecutive samples, averaged over splits (ADM: `split_size=5000`, so 50K samples = 10
  splits; torch-fidelity shuffles first, then cuts any N into 10 equal splits, so its IS differs
  slightly). Softmax and logs in float64 (`inception_score`).
* Improved precision and recall (Kynkaanniemi et al. 2019), k = 3: each set spans a manifold,
  the union of balls around its points whose radius is the distance to the point's k-th nearest
  neighbour *within its own set* (the point itself excluded; a duplicate counts as a
  neighbour). Precision = fraction of generated points inside the real manifold; recall =
  fraction of real points inside the generated manifold. Balls are closed (`<=`), as in the ADM
  evaluator.

Scale: 50K x 50K distances (10 GB in float32) never exist at once. Distances are computed in
square blocks of `block_size` rows x `block_size` columns by a jitted kernel on the default
device; the k nearest neighbours are kept as a running top-(k+1) over column blocks, and the
manifold tests as running ORs. Row blocks are independent: `row_blocks` selects a subset, so
processes can split them (`process_row_blocks`); a row not computed here holds the identity of
the combine (`inf` for radii, combined by `min`; `False` for memberships, combined by OR), and
`combine_over_processes` merges the partial results of all processes.

Numerics: squared distances `|u|^2 - 2 u.v + |v|^2` in float32 at `Precision.HIGHEST`, clamped
at 0, after both sets are centred on the real set's mean (computed in float64): distances are
translation invariant and centring shrinks the norms whose difference the expansion takes.
The ADM evaluator computes the same expansion in float16 (falling back to float32 on overflow),
so its membership decisions near a ball's boundary are noisier than ours; the metrics agree to
the rounding of those few boundary points.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from fae_jax.evaluation.frechet import FeatureStats, frechet_distance

NEIGHBOURS = 3  # k of Kynkaanniemi et al. and the ADM evaluator
IS_SPLIT_SIZE = 5000  # ADM evaluator's `compute_inception_score(split_size=5000)`
DEFAULT_BLOCK = 10000  # rows (and columns) per distance block, as the ADM evaluator


# ----------------------------------------------------------------------------------------------
# FID, sFID, IS.
# ----------------------------------------------------------------------------------------------


def fid(features_a: np.ndarray | FeatureStats, features_b: np.ndarray | FeatureStats) -> float:
  """Frechet distance between two feature sets `[N, D]` or their statistics (FID on `pool3`,
  sFID on `spatial`, FD-DINOv2 on DINOv2 features)."""

  def stats(x):
    return x if isinstance(x, FeatureStats) else FeatureStats.from_features(x)

  return frechet_distance(stats(features_a), stats(features_b))


def inception_score(logits: np.ndarray | jax.Array, split_size: int = IS_SPLIT_SIZE) -> float:
  """Inception Score of `logits` `[N, C]` (the FID Inception's `logits_unbiased`).

  Per consecutive split of `split_size` samples (the last may be shorter), with p = softmax:
  `exp(mean_i sum_c p_ic (log p_ic - log mean_i p_ic))`; the score is the mean over splits.

  Returns:
    A Python float >= 1.
  """
  x = np.asarray(logits, np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"inception_score expects logits [N, C] with N >= 1, got {x.shape}.")
  if split_size < 1:
    raise ValueError(f"inception_score: split_size must be >= 1, got {split_size}.")
  log_p = x - logsumexp(x, axis=1, keepdims=True)
  scores = []
  for start in range(0, x.shape[0], split_size):
    part = log_p[start : start + split_size]
    p = np.exp(part)
    log_marginal = logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(p * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Blocked distances.
# ----------------------------------------------------------------------------------------------


def _sq_dists(u: jax.Array, v: jax.Array) -> jax.Array:
  """`[R, D] x [C, D] -> [R, C]` squared Euclidean distances, float32, clamped at 0."""
  uu = jnp.sum(u * u, axis=1)[:, None]
  vv = jnp.sum(v * v, axis=1)[None, :]
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(uu - 2.0 * uv + vv, 0.0)


@functools.partial(jax.jit, static_argnames=("block", "k"))
def _knn_step(best, feats, valid, row_start, col_start, *, block, k):
  """Merges one column block into the running `k + 1` smallest squared distances of a row block."""
  rows = jax.lax.dynamic_slice_in_dim(feats, row_start, block)
  cols = jax.lax.dynamic_slice_in_dim(feats, col_start, block)
  cols_valid = jax.lax.dynamic_slice_in_dim(valid, col_start, block)
  d2 = jnp.where(cols_valid[None, :], _sq_dists(rows, cols), jnp.inf)
  neg_smallest, _ = jax.lax.top_k(-jnp.concatenate([best, d2], axis=1), k + 1)
  return -neg_smallest


@functools.partial(jax.jit, static_argnames=("block",))
def _membership_step(a_in, a, a_r2, a_valid, b, b_r2, b_valid, a_start, b_start, *, block):
  """One (row block of a) x (column block of b) tile of both manifold tests.

  Returns the row block's updated "inside b's manifold" flags and the column block's "inside a's
  manifold" flags from this tile.
  """
  rows = jax.lax.dynamic_slice_in_dim(a, a_start, block)
  rows_r2 = jax.lax.dynamic_slice_in_dim(a_r2, a_start, block)
  rows_valid = jax.lax.dynamic_slice_in_dim(a_valid, a_start, block)
  cols = jax.lax.dynamic_slice_in_dim(b, b_start, block)
  cols_r2 = jax.lax.dynamic_slice_in_dim(b_r2, b_start, block)
  cols_valid = jax.lax.dynamic_slice_in_dim(b_valid, b_start, block)
  d2 = _sq_dists(rows, cols)
  a_in = a_in | jnp.any((d2 <= cols_r2[None, :]) & cols_valid[None, :], axis=1)
  b_in = jnp.any((d2 <= rows_r2[:, None]) & rows_valid[:, None], axis=0)
  return a_in, b_in


def _padded(x: np.ndarray, block: int, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """`[N, ...]` -> device arrays `([ceil(N / block) * block, ...], valid [same N])`."""
  n = x.shape[0]
  total = -(-n // block) * block
  pad = np.full((total - n, *x.shape[1:]), fill, x.dtype)
  valid = np.arange(total) < n
  return jnp.asarray(np.concatenate([x, pad])), jnp.asarray(valid)


def _block_size(n: int, block_size: int) -> int:
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  return min(block_size, n)


def num_row_blocks(n: int, block_size: int = DEFAULT_BLOCK) -> int:
  return -(-n // _block_size(n, block_size))


def process_row_blocks(
  n: int,
  block_size: int = DEFAULT_BLOCK,
  process_index: int | None = None,
  process_count: int | None = None,
) -> list[int]:
  """Row blocks of this process (round robin): block i goes to process `i % process_count`."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return [i for i in range(num_row_blocks(n, block_size)) if i % count == index]


def _check_features(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < min_rows:
    raise ValueError(f"{name}: expected features [N, D] with N >= {min_rows}, got {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: features contain NaN or inf.")
  return x


def knn_radii(
  features: np.ndarray,
  k: int = NEIGHBOURS,
  *,
  block_size: int = DEFAULT_BLOCK,
  row_blocks: Sequence[int] | None = None,
  center: np.ndarray | None = None,
) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in its own set.

  Args:
    features: `[N, D]`, N > k.
    k: neighbourhood size (the point itself is the 0-th neighbour and not counted).
    block_size: rows and columns per distance tile.
    row_blocks: the row blocks to compute (all if None); rows of other blocks are `inf`.
    center: `[D]` subtracted before the distances (default: the features' own mean).

  Returns:
    `[N]` float32 squared radii.
  """
  x = _check_features(features, "knn_radii", k + 1)
  n = x.shape[0]
  center = x.mean(axis=0, dtype=np.float64) if center is None else center
  block = _block_size(n, block_size)
  feats, valid = _padded((x - center).astype(np.float32), block)
  blocks = range(num_row_blocks(n, block)) if row_blocks is None else row_blocks
  radii = np.full((feats.shape[0],), np.inf, np.float32)
  for i in blocks:
    best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
    for j in range(num_row_blocks(n, block)):
      best = _knn_step(best, feats, valid, i * block, j * block, block=block, k=k)
    radii[i * block : (i + 1) * block] = np.asarray(best[:, k])
  return radii[:n]


def manifold_membership(
  a: np.ndarray,
  a_radii: np.ndarray,
  b: np.ndarray,
  b_radii: np.ndarray,
  *,
  block_size: int = DEFAULT_BLOCK,
  row_blocks: Sequence[int] | None = None,
  center: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Which points of `a` lie in `b`'s manifold, and which points of `b` lie in `a`'s.

  Both come from one pass over the (a rows) x (b columns) tiles. With `row_blocks`, only those
  row blocks of `a` are visited: `a_in` is exact on them and False elsewhere, `b_in` is the OR
  over the visited tiles only, so the full answer is the OR over all processes' results.

  Args:
    a: `[Na, D]`; a_radii: `[Na]` squared radii (`knn_radii(a)`).
    b: `[Nb, D]`; b_radii: `[Nb]` squared radii (`knn_radii(b)`).
    block_size, row_blocks, center: as in `knn_radii` (`center` defaults to a's mean).

  Returns:
    `(a_in [Na] bool, b_in [Nb] bool)`.
  """
  a = _check_features(a, "manifold_membership(a)", 1)
  b = _check_features(b, "manifold_membership(b)", 1)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"manifold_membership: feature dims differ ({a.shape[1]} vs {b.shape[1]}).")
  center = a.mean(axis=0, dtype=np.float64) if center is None else center
  block = _block_size(max(a.shape[0], b.shape[0]), block_size)
  a_dev, a_valid = _padded((a - center).astype(np.float32), block)
  b_dev, b_valid = _padded((b - center).astype(np.float32), block)
  a_r2, _ = _padded(np.asarray(a_radii, np.float32), block, fill=-1.0)
  b_r2, _ = _padded(np.asarray(b_radii, np.float32), block, fill=-1.0)
  na_blocks = a_dev.shape[0] // block
  nb_blocks = b_dev.shape[0] // block
  a_in = np.zeros((a_dev.shape[0],), bool)
  b_in = np.zeros((b_dev.shape[0],), bool)
  for i in range(na_blocks) if row_blocks is None else row_blocks:
    rows_in = jnp.zeros((block,), bool)
    for j in range(nb_blocks):
      rows_in, cols_in = _membership_step(
        rows_in, a_dev, a_r2, a_valid, b_dev, b_r2, b_valid, i * block, j * block, block=block
      )
      b_in[j * block : (j + 1) * block] |= np.asarray(cols_in)
    a_in[i * block : (i + 1) * block] = np.asarray(rows_in)
  return a_in[: a.shape[0]], b_in[: b.shape[0]]


def combine_over_processes(x: np.ndarray, how: str) -> np.ndarray:
  """Merges per-process partial results: `how='min'` (radii) or `'or'` (memberships)."""
  if how not in ("min", "or"):
    raise ValueError(f"combine_over_processes: how must be 'min' or 'or', got {how!r}.")
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils

  stacked = np.asarray(multihost_utils.process_allgather(x))
  return stacked.min(axis=0) if how == "min" else stacked.any(axis=0)


def precision_recall(
  real: np.ndarray,
  fake: np.ndarray,
  k: int = NEIGHBOURS,
  *,
  block_size: int = DEFAULT_BLOCK,
) -> tuple[float, float]:
  """Improved precision and recall of `fake` `[Nf, D]` against `real` `[Nr, D]`.

  In a multi-process run every process must call this with the same features; each computes its
  share of the row blocks (`process_row_blocks`) and the results are merged over processes.

  Returns:
    `(precision, recall)`: the fraction of fake points inside the real manifold, the fraction
    of real points inside the fake manifold.
  """
  real = _check_features(real, "precision_recall(real)", k + 1)
  fake = _check_features(fake, "precision_recall(fake)", k + 1)
  center = real.mean(axis=0, dtype=np.float64)

  def radii(x):
    mine = process_row_blocks(x.shape[0], _block_size(x.shape[0], block_size))
    r = knn_radii(x, k, block_size=block_size, row_blocks=mine, center=center)
    return combine_over_processes(r, "min")

  real_r2, fake_r2 = radii(real), radii(fake)
  block = _block_size(max(real.shape[0], fake.shape[0]), block_size)
  real_in, fake_in = manifold_membership(
    real,
    real_r2,
    fake,
    fake_r2,
    block_size=block_size,
    row_blocks=process_row_blocks(real.shape[0], block),
    center=center,
  )
  real_in = combine_over_processes(real_in, "or")
  fake_in = combine_over_processes(fake_in, "or")
  return float(np.mean(fake_in)), float(np.mean(real_in))


def adm_metrics(
  sample_acts: dict[str, np.ndarray],
  ref_stats,
  ref_pool3: np.ndarray | None,
  *,
  block_size: int = DEFAULT_BLOCK,
) -> dict[str, float | None]:
  """The ADM evaluator's table from Inception activations.

  Args:
    sample_acts: the samples' `pool3`, `spatial`, `logits_unbiased` (`[N, ...]`).
    ref_stats: `adm_npz.ReferenceStats` of the reference batch.
    ref_pool3: the reference images' `pool3` for precision/recall, or None (then both None).

  Returns:
    `{'inception_score', 'fid', 'sfid', 'precision', 'recall'}`. Collective in a multi-process
    run (precision/recall): every process calls it with the same activations.
  """
  from fae_jax.evaluation import adm_npz

  stats = adm_npz.reference_stats_from_activations(sample_acts)
  table: dict[str, float | None] = {
    "inception_score": inception_score(sample_acts["logits_unbiased"]),
    "fid": fid(stats.pool, ref_stats.pool),
    "sfid": fid(stats.spatial, ref_stats.spatial),
    "precision": None,
    "recall": None,
  }
  if ref_pool3 is not None:
    table["precision"], table["recall"] = precision_recall(
      ref_pool3, sample_acts["pool3"], block_size=block_size
    )
  return table
