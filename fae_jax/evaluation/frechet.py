"""Frechet distance between Gaussian fits of two feature sets (FID, FD-DINOv2).

Features come from a network run in JAX; their statistics and the distance are computed here in
float64 NumPy, on the host, because the matrix square root of a covariance with eigenvalues
spanning ten orders of magnitude is not something float32 (or a TPU's default matmul
precision) gets right. Statistics are written in the ADM reference-batch `.npz` layout (keys
`mu` and `sigma`, plus our own `count`), so reference files of the guided-diffusion evaluation
suite load directly and our files load in theirs.

The square root is taken by symmetric eigendecomposition (`numpy.linalg.eigh`), never by
`scipy.linalg.sqrtm`, whose Schur-based result has had NaN and complex-valued regressions.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fae_jax import fileio

PoolMode = Literal["cls", "mean_patch"]


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Mean and covariance of a feature set.

  Attributes:
    mean: `[D]` float64.
    cov: `[D, D]` float64, the unbiased (N - 1) covariance, as `numpy.cov` and the reference
      FID implementations compute it.
    count: number of feature vectors behind the statistics; `None` when unknown (ADM reference
      files do not store it).
  """

  mean: np.ndarray
  cov: np.ndarray
  count: int | None = None

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float64)
    cov = np.asarray(self.cov, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
      raise ValueError(
        f"FeatureStats: expected mean [D] and cov [D, D], got {mean.shape} and {cov.shape}."
      )
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "cov", cov)

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  @classmethod
  def from_features(cls, features: np.ndarray | jax.Array) -> FeatureStats:
    """One-shot statistics of `features` `[N, D]` (N >= 2), in float64."""
    acc = StatsAccumulator()
    acc.update(features)
    return acc.finalize()

  def save_npz(self, path: str | os.PathLike) -> None:
    """Writes `mu`, `sigma` (ADM layout) and `count` (-1 if unknown); atomically."""
    buf = io.BytesIO()
    np.savez(
      buf, mu=self.mean, sigma=self.cov, count=np.int64(-1 if self.count is None else self.count)
    )
    fileio.write_bytes_atomic(path, buf.getvalue())

  @classmethod
  def load_npz(cls, path: str | os.PathLike) -> FeatureStats:
    """Reads statistics written by `save_npz` or an ADM reference batch (`mu`, `sigma`).

    ADM reference batches also hold images (`arr_0`) and spatial statistics (`mu_s`,
    `sigma_s`); those are ignored.
    """
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"FeatureStats.load_npz: no statistics file at {path}.")
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
      missing = {"mu", "sigma"} - set(data.files)
      if missing:
        raise ValueError(
          f"FeatureStats.load_npz: {path} lacks key(s) {sorted(missing)}; it has {data.files}. "
          "Expected an ADM-style reference batch or a file written by FeatureStats.save_npz."
        )
      count = int(data["count"]) if "count" in data.files else -1
      return cls(mean=data["mu"], cov=data["sigma"], count=None if count < 0 else count)


class StatsAccumulator:
  """Streaming mean/covariance over batches of features, merged in float64.

  Each batch is centred on its own mean before its scatter matrix is formed, and batches are
  combined with the pairwise update of Chan et al. (1979): with running (n_a, m_a, M_a) and a
  batch (n_b, m_b, M_b), `delta = m_b - m_a`, `n = n_a + n_b`, `m = m_a + delta * n_b / n`,
  `M = M_a + M_b + outer(delta, delta) * n_a * n_b / n`. Unlike summing raw `x x^T`, this
  never subtracts two large nearly equal numbers, so features with a large common offset keep
  their small variances. The result does not depend on how the data is split into batches
  (up to rounding).
  """

  def __init__(self):
    self._count = 0
    self._mean: np.ndarray | None = None
    self._scatter: np.ndarray | None = None  # sum of outer products of centred features

  @property
  def count(self) -> int:
    return self._count

  def update(self, batch: np.ndarray | jax.Array) -> None:
    """Adds `batch` `[B, D]` (any float dtype; converted to float64)."""
    x = np.asarray(batch, np.float64)
    if x.ndim != 2:
      raise ValueError(f"StatsAccumulator.update expects features [B, D], got shape {x.shape}.")
    if self._mean is not None and x.shape[1] != self._mean.shape[0]:
      raise ValueError(
        f"StatsAccumulator.update: feature dim {x.shape[1]} differs from the earlier "
        f"{self._mean.shape[0]}."
      )
    n_b = x.shape[0]
    if n_b == 0:
      return
    if not np.all(np.isfinite(x)):
      raise ValueError("StatsAccumulator.update: features contain NaN or inf.")
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    scatter_b = centred.T @ centred
    if self._mean is None:
      self._count, self._mean, self._scatter = n_b, mean_b, scatter_b
      return
    n_a = self._count
    n = n_a + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
    self._count = n

  def finalize(self) -> FeatureStats:
    """The statistics so far; the accumulator stays usable."""
    if self._count < 2:
      raise ValueError(
        f"StatsAccumulator.finalize: a covariance needs at least 2 samples, got {self._count}."
      )
    cov = self._scatter / (self._count - 1)
    cov = 0.5 * (cov + cov.T)  # exact symmetry, so eigh sees what it assumes
    return FeatureStats(mean=self._mean.copy(), cov=cov, count=self._count)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root `V diag(sqrt(max(w, 0))) V^T` of a symmetric `[D, D]` matrix."""
  w, v = np.linalg.eigh(0.5 * (matrix + matrix.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
  """Frechet distance between N(mu_a, S_a) and N(mu_b, S_b).

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).

  The textbook form has `tr((S_a S_b)^{1/2})`; the two traces are equal. Let
  M = S_a^{1/2} S_b S_a^{1/2}. M is symmetric positive semi-definite (x^T M x =
  (S_a^{1/2} x)^T S_b (S_a^{1/2} x) >= 0), so M = V diag(lambda) V^T with real lambda >= 0.
  When S_a is invertible, S_a S_b = S_a^{1/2} M S_a^{-1/2} = P diag(lambda) P^{-1} with
  P = S_a^{1/2} V: it is similar to M, and its principal square root is
  P diag(sqrt(lambda)) P^{-1}, whose trace is sum_i sqrt(lambda_i) = tr(M^{1/2}). (A singular S_a
  is the limit of invertible ones, and both sides are continuous; also AB and BA always share
  eigenvalues, here A = S_a^{1/2}, B = S_a^{1/2} S_b.)

  Working with M instead of S_a S_b keeps every step symmetric: S_a^{1/2} and the eigenvalues
  of M both come from `eigh` in float64, and eigenvalues that rounding pushes slightly below
  zero (rank-deficient covariances, e.g. fewer samples than dimensions) are clipped to 0
  instead of turning the root complex. Only the trace of M^{1/2} is needed, so it is the sum
  of the square roots of M's eigenvalues.

  Args:
    stats_a: statistics of one feature set.
    stats_b: statistics of the other (same dimension).

  Returns:
    The distance as a Python float, >= 0 (a negative value can only come from rounding and is
    reported as 0).
  """
  if stats_a.dim != stats_b.dim:
    raise ValueError(
      f"frechet_distance: feature dims differ ({stats_a.dim} vs {stats_b.dim}); both sets must "
      "come from the same feature extractor."
    )
  for name, stats in (("stats_a", stats_a), ("stats_b", stats_b)):
    if not (np.all(np.isfinite(stats.mean)) and np.all(np.isfinite(stats.cov))):
      raise ValueError(f"frechet_distance: {name} contains NaN or inf.")
  diff = stats_a.mean - stats_b.mean
  sqrt_a = _sqrt_psd(stats_a.cov)
  middle = sqrt_a @ stats_b.cov @ sqrt_a
  eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  fd = diff @ diff + np.trace(stats_a.cov) + np.trace(stats_b.cov) - 2.0 * tr_covmean
  return float(max(fd, 0.0))


def fd_features(
  tokens: jax.Array | np.ndarray, *, pool: PoolMode = "mean_patch", num_prefix_tokens: int = 0
) -> jax.Array:
  """Pools encoder outputs into one vector per image for FD-DINOv2: `-> [B, D]` float32.

  Stein et al. (2023, "Exposing flaws of generative model evaluation metrics") define
  FD-DINOv2 on the CLS token of DINOv2 ViT-L/14. Our frozen encoder wrapper returns patch
  tokens only (CLS and registers dropped, final LayerNorm without affine; see DESIGN.md), so the
  default here is `mean_patch`, the mean over patch tokens. Numbers computed this way are
  FD-DINOv2 in spirit but are not comparable with published values; they compare our own runs
  with each other. `cls` reproduces the published definition when the encoder is run with its
  CLS token kept (and the ViT-L weights).

  Args:
    tokens: `[B, N, D]` token sequence whose first `num_prefix_tokens` entries are CLS (first)
      and register tokens, followed by patch tokens; or `[B, D]`, an already pooled vector
      (e.g. a CLS embedding), which is accepted only with `pool='cls'` and returned as is.
    pool: `mean_patch` (default) averages the patch tokens; `cls` takes token 0.
    num_prefix_tokens: how many leading non-patch tokens `tokens` holds; `cls` needs >= 1.

  Returns:
    `[B, D]` float32 features.
  """
  x = jnp.asarray(tokens).astype(jnp.float32)
  if pool not in ("cls", "mean_patch"):
    raise ValueError(f"fd_features: pool must be 'cls' or 'mean_patch', got {pool!r}.")
  if x.ndim == 2:
    if pool != "cls":
      raise ValueError(
        f"fd_features: got pooled features {x.shape} with pool='mean_patch'; pass patch tokens "
        "[B, N, D], or pool='cls' for a CLS embedding."
      )
    return x
  if x.ndim != 3:
    raise ValueError(f"fd_features expects tokens [B, N, D] or [B, D], got shape {x.shape}.")
  if not 0 <= num_prefix_tokens < x.shape[1]:
    raise ValueError(
      f"fd_features: num_prefix_tokens={num_prefix_tokens} leaves no patch tokens in {x.shape}."
    )
  if pool == "cls":
    if num_prefix_tokens < 1:
      raise ValueError(
        "fd_features: pool='cls' needs the CLS token (num_prefix_tokens >= 1); the encoder "
        "drops it by default, use pool='mean_patch' or keep the CLS token in the encoder."
      )
    return x[:, 0]
  return jnp.mean(x[:, num_prefix_tokens:], axis=1)
