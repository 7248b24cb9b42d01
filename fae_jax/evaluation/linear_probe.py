"""Linear probe: multinomial logistic regression on pooled features, trained in JAX.

Used to check that FAE latents and reconstructed features keep the semantics of the frozen
encoder (the paper reports ImageNet top-1 of a linear head on x_hat), and for the offline
"class consistency" metric of generated samples.

Recipe: mean-pool tokens (`[B, N, D]` or latents `[B, h, w, c]`) to `[B, D]`; standardise every
feature with the train-set mean and std; minimise mean cross-entropy + `l2/2 * ||W||^2` (bias
unregularised) from zero init, either full-batch with L-BFGS (default; the problem is convex so
the result depends only on the data) or with minibatch Adam for sets that do not fit one
batch (the minibatch order comes from `seed`). Everything runs in one jitted loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

ProbeParams = dict[str, jax.Array]  # {'mean': [D], 'scale': [D], 'w': [D, K], 'b': [K]}

_STD_FLOOR = 1e-6


def pool_tokens(x: jax.Array | np.ndarray) -> jax.Array:
  """Mean-pools spatial positions: `[B, N, D]` or `[B, h, w, c]` -> `[B, D]`; `[B, D]` passes."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 2:
    return x
  if x.ndim in (3, 4):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
  raise ValueError(f"pool_tokens expects [B, D], [B, N, D] or [B, h, w, c], got {x.shape}.")


def _objective(wb: dict[str, jax.Array], x: jax.Array, y: jax.Array, l2: jax.Array) -> jax.Array:
  logits = x @ wb["w"] + wb["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.mean(ce) + 0.5 * l2 * jnp.sum(jnp.square(wb["w"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_lbfgs(
  x: jax.Array, y: jax.Array, l2: jax.Array, tol: jax.Array, *, num_classes: int, steps: int
) -> dict[str, jax.Array]:
  d = x.shape[1]
  wb = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
  fn = functools.partial(_objective, x=x, y=y, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fn)

  def step(carry):
    wb, state = carry
    value, grad = value_and_grad(wb, state=state)
    updates, state = opt.update(grad, state, wb, value=value, grad=grad, value_fn=fn)
    return optax.apply_updates(wb, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad = optax.tree.get(state, "grad")
    return (count == 0) | ((count < steps) & (optax.tree.norm(grad) > tol))

  wb, _ = jax.lax.while_loop(keep_going, step, (wb, opt.init(wb)))
  return wb


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def _fit_adam(
  x: jax.Array,
  y: jax.Array,
  l2: jax.Array,
  learning_rate: jax.Array,
  key: jax.Array,
  *,
  num_classes: int,
  steps: int,
  batch_size: int,
) -> dict[str, jax.Array]:
  d = x.shape[1]
  wb = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
  opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def step(carry, i):
    wb, state = carry
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, x.shape[0])
    grad = jax.grad(_objective)(wb, x[idx], y[idx], l2)
    updates, state = opt.update(grad, state, wb)
    return (optax.apply_updates(wb, updates), state), None

  (wb, _), _ = jax.lax.scan(step, (wb, opt.init(wb)), jnp.arange(steps))
  return wb


def train_linear_probe(
  train_x: jax.Array | np.ndarray,
  train_y: jax.Array | np.ndarray,
  num_classes: int,
  *,
  l2: float = 1e-4,
  steps: int = 500,
  seed: int = 0,
  method: str = "lbfgs",
  batch_size: int = 1024,
  learning_rate: float = 1e-2,
  tol: float = 1e-6,
) -> ProbeParams:
  """Fits a linear classifier on (pooled, standardised) features.

  Args:
    train_x: features `[B, D]`, tokens `[B, N, D]` or latents `[B, h, w, c]` (mean-pooled).
    train_y: integer labels `[B]` in `[0, num_classes)`.
    num_classes: K.
    l2: weight of `0.5 * ||W||^2` added to the mean cross-entropy (1e-4 = sklearn's C = 1 at
      10k examples).
    steps: maximum L-BFGS iterations, or Adam steps.
    seed: minibatch order for 'adam' (L-BFGS is deterministic without it).
    method: 'lbfgs' (full batch) or 'adam' (minibatches of `batch_size`).
    batch_size, learning_rate: Adam only (cosine-decayed learning rate).
    tol: L-BFGS stops when the gradient norm falls below it.

  Returns:
    `{'mean': [D], 'scale': [D], 'w': [D, K], 'b': [K]}` float32.
  """
  x = pool_tokens(train_x)
  y = jnp.asarray(train_y, jnp.int32).reshape(-1)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"train_linear_probe: {x.shape[0]} features but {y.shape[0]} labels.")
  mean = jnp.mean(x, axis=0)
  scale = jnp.maximum(jnp.std(x, axis=0), _STD_FLOOR)
  xs = (x - mean) / scale
  l2_arr = jnp.float32(l2)
  if method == "lbfgs":
    wb = _fit_lbfgs(xs, y, l2_arr, jnp.float32(tol), num_classes=num_classes, steps=steps)
  elif method == "adam":
    wb = _fit_adam(
      xs,
      y,
      l2_arr,
      jnp.float32(learning_rate),
      jax.random.key(seed),
      num_classes=num_classes,
      steps=steps,
      batch_size=min(batch_size, x.shape[0]),
    )
  else:
    raise ValueError(f"Unknown probe method {method!r}; choose 'lbfgs' or 'adam'.")
  return {"mean": mean, "scale": scale, "w": wb["w"], "b": wb["b"]}


@jax.jit
def probe_logits(params: ProbeParams, x: jax.Array) -> jax.Array:
  """`[B, D] -> [B, K]` logits of a trained probe (x already pooled)."""
  return ((x - params["mean"]) / params["scale"]) @ params["w"] + params["b"]


def probe_accuracy(
  params: ProbeParams,
  x: jax.Array | np.ndarray,
  y: jax.Array | np.ndarray,
  *,
  batch_size: int = 8192,
) -> float:
  """Top-1 accuracy in [0, 1] of a probe on features/tokens/latents `x` with labels `y [B]`."""
  x = pool_tokens(x)
  y = np.asarray(y).reshape(-1)
  if x.shape[0] != y.shape[0] or y.shape[0] == 0:
    raise ValueError(f"probe_accuracy: {x.shape[0]} features but {y.shape[0]} labels.")
  correct = 0
  for start in range(0, x.shape[0], batch_size):
    pred = np.asarray(jnp.argmax(probe_logits(params, x[start : start + batch_size]), axis=-1))
    correct += int(np.sum(pred == y[start : start + batch_size]))
  return correct / y.shape[0]


def linear_probe_top1(
  train_x: jax.Array | np.ndarray,
  train_y: jax.Array | np.ndarray,
  test_x: jax.Array | np.ndarray,
  test_y: jax.Array | np.ndarray,
  num_classes: int,
  **train_kwargs,
) -> float:
  """Trains a probe on the train split and returns its top-1 accuracy on the test split."""
  params = train_linear_probe(train_x, train_y, num_classes, **train_kwargs)
  return probe_accuracy(params, test_x, test_y)
