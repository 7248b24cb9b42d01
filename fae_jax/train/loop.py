"""The train loop every stage calls (FAE, pixel decoder, diffusion, flow).

A stage supplies the model-specific pieces and this module does the rest:

  init_params_fn(rng) -> params
  loss_fn(params, batch, rng, *extra_args) -> (loss, metrics)
  data_iter_fn() -> a checkpointable grain iterator of per-process numpy batches

Flow (big_vision style): `jax.eval_shape` of the init -> parameter shardings from the config's
regex rules -> jitted init with `out_shardings` (nothing is built on one device first) -> restore
the latest checkpoint if the stage has one -> jitted step with explicit in/out shardings and the
state donated. Frozen arrays a loss needs (e.g. encoder weights) come in `extra_args` and enter
the step as sharded jit arguments, never as closure constants baked into the executable.

Step `s` (0-based) reads the `s`-th batch of the iterator and the key `fold_in(rng, s)`; the
iterator position and the state are checkpointed together, so a resumed run reproduces an
uninterrupted one exactly.

Metrics: every `log_every` steps the per-step metrics are averaged (non-scalar metrics: the mean,
plus a histogram of the last step's values) and written with `perf/steps_per_sec`,
`perf/examples_per_sec` and, when `flops_per_example` is given, `perf/mfu`:

  mfu = 3 * flops_per_example * global_batch * steps_per_sec / (peak_flops * device_count)

`flops_per_example` is the forward FLOPs of the trained model for one example; the factor 3
counts the backward pass as twice the forward (the usual convention; frozen parts that get no
gradient are therefore over-counted). `peak_flops` comes from `fae_jax.train.mfu`. Timing
excludes the first step (compilation), evaluations and checkpoint saves.

The host checks each step's loss one step late (after dispatching the next step), so the device
always has work queued; a non-finite loss raises `FloatingPointError` naming the step before any
checkpoint of the broken state is written.

Fault injection (`fae_jax.faults`, the restart tests): the kill points `train:<stage>:step` after
each step (checkpoints finished first; with several processes all meet at a barrier, then the
chosen one dies, like a host lost in the middle of training) and `train:<stage>:saving` right
after an asynchronous checkpoint save has started.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.sharding import Mesh, NamedSharding

from fae_jax import faults
from fae_jax import sharding as sharding_lib
from fae_jax.train import checkpoint as ckpt_lib
from fae_jax.train import metrics as metrics_lib
from fae_jax.train import mfu as mfu_lib
from fae_jax.train import optim
from fae_jax.train.state import (
  TrainState,
  abstract_train_state,
  create_train_state,
  ema_decay_at,
  update_ema,
)

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def default_train_config() -> ml_collections.ConfigDict:
  """Every field `train` and `make_optimizer` read, with defaults; stages override what they need."""
  c = ml_collections.ConfigDict()
  c.num_steps = 1000
  c.batch_size = 64  # global; the stage's pipeline yields batch_size // process_count per host
  # Optimizer (fae_jax.train.optim).
  c.lr = 1e-4
  c.schedule = "cosine"  # 'cosine' | 'constant'
  c.warmup_steps = 0
  c.end_lr_factor = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 1.0  # global norm; 0 = off
  c.wd_mask = optim.DEFAULT_WD_MASK
  # EMA of the parameters: 0 = off.
  c.ema_decay = 0.0
  c.ema_warmup = False
  # FSDP: parameters whose path matches a rule and with >= fsdp_min_size elements are sharded.
  c.fsdp_rules = (".*",)
  c.fsdp_min_size = 2**14
  # Logging, evaluation, checkpoints.
  c.log_every = 50
  c.eval_every = 0  # 0 = only if the stage asks; eval_fn also runs after the last step
  c.checkpoint_every = 1000
  c.keep = 3  # newest checkpoints kept; milestones are kept forever
  c.milestones = ()
  c.async_checkpointing = True
  # Gradient accumulation: each step averages the gradients of k micro-batches of
  # batch_size / k examples (the same update as one step on the whole batch, with 1/k of the
  # activation memory); batch_size stays the global batch of one optimizer step.
  c.grad_accum_steps = 1
  # Steps (0-based) traced with jax.profiler into <workdir>/<stage>/profile (TensorBoard's
  # profile plugin / Perfetto); a run of consecutive steps is one trace. () = none.
  c.profile_steps = ()
  return c


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written; exits the process with status 0.

  A `SystemExit` so that `main` stops (no later stage runs on an unfinished model) without a
  traceback; the restarted job resumes from the checkpoint.
  """

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


def _named_metrics(metrics: Mapping[str, Any], group: str) -> dict[str, Any]:
  return {(k if "/" in k else f"{group}/{k}"): v for k, v in metrics.items()}


def make_train_step(
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optim.Schedule,
  config: ml_collections.ConfigDict,
  shardings: TrainState,
  mesh: Mesh,
  extra_shardings: Any = (),
  loss_takes_step: bool = False,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step `(state, global_batch, extra_args) -> (state, metrics)`; `state` is donated.

  With `loss_takes_step`, the loss is called as `loss_fn(..., step=state.step)` (a traced int32
  scalar), for objectives with step-dependent terms such as a GAN loss switched on at a step.

  With `config.grad_accum_steps = k > 1`, the global batch is split into k micro-batches (row
  `i` goes to micro-batch `i % k`, so each stays spread over every batch shard) that run one
  after another in a `lax.scan`; micro-batch `j` uses the key `fold_in(step key, j)`. Gradients,
  loss and metrics are the means over the micro-batches: for a loss that is a mean over
  examples this is the step on the whole batch, with the activations of one micro-batch.

  Metrics: the loss_fn's metrics (a name without a group goes to `train/`), `train/loss`,
  `train/grad_norm` (global L2 norm before clipping) and `train/lr` (the rate of this step).
  """
  ema_decay = float(config.get("ema_decay", 0.0))
  ema_warmup = bool(config.get("ema_warmup", False))
  accum = int(config.get("grad_accum_steps", 1) or 1)
  if accum < 1:
    raise ValueError(f"train.grad_accum_steps must be >= 1, got {accum}.")
  shards = sharding_lib.num_batch_shards(mesh)

  def grads_of(params, batch, rng, extra, step):
    def objective(p):
      if loss_takes_step:
        return loss_fn(p, batch, rng, *extra, step=step)
      return loss_fn(p, batch, rng, *extra)

    # Activations pinned to the batch axes (sharding.activation_sharding); gradients to the
    # parameters' own sharding, so XLA reduce-scatters them rather than all-reducing full copies.
    with sharding_lib.activation_sharding(mesh):
      (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return (loss, aux), jax.lax.with_sharding_constraint(grads, shardings.params)

  def accumulated(params, batch, rng, extra, step):
    size = len(jax.tree.leaves(batch)[0])
    if size % (accum * shards):
      raise ValueError(
        f"train.grad_accum_steps={accum}: the global batch {size} must be a multiple of "
        f"grad_accum_steps x the {shards} batch shards ({accum * shards}); change "
        "train.batch_size or train.grad_accum_steps."
      )
    micro_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))

    def split(x):
      x = x.reshape(size // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    micro = jax.tree.map(split, batch)

    def body(acc, inputs):
      j, mb = inputs
      (loss, aux), grads = grads_of(params, mb, jax.random.fold_in(rng, j), extra, step)
      acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
      return acc, (loss, aux)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)  # the carry's sharding
    total, (losses, auxes) = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    grads = jax.tree.map(lambda t, p: (t / accum).astype(p.dtype), total, params)
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)
    return (jnp.mean(losses), aux), grads

  def step_fn(state: TrainState, batch: Any, extra: Any):
    rng = state.step_rng()
    if accum == 1:
      (loss, aux), grads = grads_of(state.params, batch, rng, extra, state.step)
    else:
      (loss, aux), grads = accumulated(state.params, batch, rng, extra, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = update_ema(ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup))
    metrics = _named_metrics(aux, "train")
    metrics.update(
      {
        "train/loss": loss.astype(jnp.float32),
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
      }
    )
    new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
    )
    return new_state, metrics

  return jax.jit(
    step_fn,
    in_shardings=(shardings, sharding_lib.batch_sharding(mesh), extra_shardings),
    out_shardings=(shardings, sharding_lib.replicated(mesh)),
    donate_argnums=(0,),
  )


@contextlib.contextmanager
def _closing(writer: metric_writers.MetricWriter):
  try:
    yield writer
  finally:
    writer.close()


def _format_metrics(metrics: Mapping[str, Any]) -> str:
  parts = []
  for k, v in sorted(metrics.items()):
    v = np.asarray(v)
    parts.append(f"{k}={float(v.mean()) if v.size else float('nan'):.6g}")
  return ", ".join(parts)


def train(
  *,
  workdir: str | epath.PathLike,
  stage: str,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  init_params_fn: Callable[[jax.Array], Any],
  loss_fn: LossFn,
  data_iter_fn: Callable[[], Any],
  seed: int = 0,
  flops_per_example: float | None = None,
  eval_fn: Callable[[TrainState], Mapping[str, Any] | None] | None = None,
  extra_args: tuple[Any, ...] = (),
  saved_config: Any = None,
  loss_takes_step: bool = False,
  init_params: Any = None,
  step_key: jax.Array | None = None,
) -> TrainState:
  """Trains (or resumes) a stage to `config.num_steps` and returns the final state.

  Args:
    workdir: the run's root directory; the stage writes `<workdir>/<stage>/` (TensorBoard events)
      and `<workdir>/<stage>/checkpoints/`.
    stage: the stage's subfolder name, e.g. 'fae', 'pixel', 'diffusion'.
    config: the stage's train ConfigDict (fields: `default_train_config`).
    mesh: the `('data', 'fsdp')` mesh.
    init_params_fn: `rng -> params` (float32), traced by `jax.eval_shape` and a sharded jit.
    loss_fn: `(params, batch, rng, *extra_args) -> (scalar loss, {name: metric})`; the compute
      dtype is its own business. `batch` holds global arrays sharded over the batch axes.
    data_iter_fn: returns a fresh checkpointable grain iterator (`get_state`/`set_state`) of this
      process's batches (leading dimension = global batch / process count). It must not end
      before `num_steps` (use `.repeat()`).
    seed: the run's seed; init uses one half of `key(seed)`, the steps the other.
    flops_per_example: forward FLOPs per example, for `perf/mfu`; None skips MFU.
    eval_fn: `state -> {name: scalar}` run every `config.eval_every` steps and after the last
      step (names without a group go to `eval/`).
    extra_args: tuple of frozen array pytrees passed to `loss_fn` after `rng`; they are placed by
      the FSDP rules and enter the step as sharded arguments.
    saved_config: what the `config` checkpoint item stores (default: `config`); pass the whole
      experiment config so a checkpoint describes itself.
    loss_takes_step: call `loss_fn(..., step=step)` with the traced step (see make_train_step).
    init_params: start from these weights (fresh optimizer, EMA = them) instead of
      `init_params_fn`'s random init, e.g. a second phase continuing the first one's model;
      `init_params_fn` still gives the structure. Ignored once the stage has a checkpoint.
    step_key: the key the step keys fold from, instead of the seed's (a second phase of the same
      seed passes its own, so its randomness differs from the first phase's).

  Returns:
    The final `TrainState`; if the stage already reached `num_steps`, the restored one.

  Raises:
    FloatingPointError: the loss (or gradient norm) became NaN/Inf; names the step.
    Preempted: after SIGTERM (or a multi-host preemption notice) and the checkpoint save.
  """
  stage_dir = epath.Path(workdir) / stage
  num_steps = int(config.num_steps)
  tx, schedule = optim.make_optimizer(config)
  ckpt = ckpt_lib.Checkpointer(
    stage_dir / "checkpoints",
    checkpoint_every=int(config.get("checkpoint_every", 0) or 0),
    keep=config.get("keep", 3),
    milestones=tuple(config.get("milestones", ()) or ()),
    async_save=bool(config.get("async_checkpointing", True)),
  )
  saved_config = config if saved_config is None else saved_config
  try:
    abstract, shardings = abstract_train_state(
      config=config, mesh=mesh, init_params_fn=init_params_fn, tx=tx, seed=seed
    )
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    latest = ckpt.latest_step()
    if latest is not None and latest >= num_steps:
      state, _ = ckpt.restore(latest, target)
      logging.info("%s: already trained (checkpoint at step %d >= %d).", stage, latest, num_steps)
      return state
    data_iter = data_iter_fn()
    if not (hasattr(data_iter, "get_state") and hasattr(data_iter, "set_state")):
      raise TypeError(
        f"{stage}: data_iter_fn must return a checkpointable grain iterator (with get_state/"
        f"set_state), got {type(data_iter).__name__}; build it with grain's MapDataset/"
        "IterDataset or DataLoader."
      )
    if latest is not None:
      state, data_iter = ckpt.restore(latest, target, data_iter)
    else:
      state, _ = create_train_state(
        config=config,
        mesh=mesh,
        init_params_fn=init_params_fn,
        tx=tx,
        seed=seed,
        init_params=init_params,
        step_key=step_key,
      )
    extra_args = tuple(extra_args)
    extra_shardings = sharding_lib.param_shardings(
      extra_args,
      mesh,
      tuple(config.get("fsdp_rules", (".*",))),
      int(config.get("fsdp_min_size", 2**14)),
    )
    extra_args = jax.device_put(extra_args, extra_shardings)
    train_step = make_train_step(
      loss_fn=loss_fn,
      tx=tx,
      schedule=schedule,
      config=config,
      shardings=shardings,
      mesh=mesh,
      extra_shardings=extra_shardings,
      loss_takes_step=loss_takes_step,
    )
    return _run(
      stage=stage,
      stage_dir=stage_dir,
      config=config,
      mesh=mesh,
      state=state,
      train_step=train_step,
      data_iter=data_iter,
      extra_args=extra_args,
      ckpt=ckpt,
      eval_fn=eval_fn,
      flops_per_example=flops_per_example,
      saved_config=saved_config,
    )
  finally:
    ckpt.close()


def _run(
  *,
  stage: str,
  stage_dir: epath.Path,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  state: TrainState,
  train_step: Callable,
  data_iter: Any,
  extra_args: Any,
  ckpt: ckpt_lib.Checkpointer,
  eval_fn: Callable | None,
  flops_per_example: float | None,
  saved_config: Any,
) -> TrainState:
  """The step loop of `train` (state already initialised or restored)."""
  num_steps = int(config.num_steps)
  log_every = int(config.get("log_every", 0) or 0)
  eval_every = int(config.get("eval_every", 0) or 0)
  writer = metric_writers.create_default_writer(stage_dir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    stage_dir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.MultiWriter(
      [writer, metrics_lib.JsonlWriter(stage_dir / metrics_lib.LOG_NAME)]
    )
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  start_step = step = int(jax.device_get(state.step))
  logging.info("%s: training steps %d -> %d.", stage, start_step, num_steps)

  pending: tuple[int, Any] | None = None  # the last dispatched step, not yet checked
  # Checked host metrics since the last log (a resumed run's window starts where it stopped).
  history: list[dict[str, np.ndarray]] = metrics_lib.load_window(stage_dir, start_step)
  last_finite: tuple[int, dict[str, np.ndarray]] | None = None
  global_batch_size = 0
  peak: tuple[float, str] | None = None
  timer = {"start": time.perf_counter(), "steps": 0}
  run_start = time.perf_counter()
  split = metrics_lib.TimeSplit()

  def check_pending() -> None:
    """Waits for the last dispatched step and stops on a non-finite loss or gradient."""
    nonlocal pending, last_finite
    if pending is None:
      return
    done_step, metrics = pending
    pending = None
    host = jax.device_get(metrics)
    for name in ("train/loss", "train/grad_norm"):
      if not np.all(np.isfinite(host[name])):
        before = (
          f"last finite metrics (step {last_finite[0]}): {_format_metrics(last_finite[1])}"
          if last_finite
          else "no finite step before it in this run"
        )
        raise FloatingPointError(
          f"{stage}: {name} is {host[name]} at step {done_step}; {before}. Nothing from this "
          f"step was checkpointed (latest checkpoint: step {ckpt.latest_step()}). Lower "
          "train.lr, set train.grad_clip, or check the input data of that step."
        )
    last_finite = (done_step, host)
    history.append(host)
    timer["steps"] += 1

  def reset_timer() -> None:
    timer["start"], timer["steps"] = time.perf_counter(), 0

  def write_train_metrics(at_step: int) -> None:
    nonlocal peak
    if not history:
      return
    scalars, histograms = {}, {}
    for name in history[0]:
      values = np.stack([np.asarray(h[name], np.float64) for h in history])
      scalars[name] = float(values.mean())
      if values.ndim > 1:
        histograms[name] = values[-1]
    elapsed = time.perf_counter() - timer["start"]
    if timer["steps"] > 0 and elapsed > 0:
      steps_per_sec = timer["steps"] / elapsed
      scalars["perf/steps_per_sec"] = steps_per_sec
      scalars["perf/examples_per_sec"] = steps_per_sec * global_batch_size
      if flops_per_example:
        if peak is None:
          peak = mfu_lib.device_peak_flops(mesh.devices.flat[0])
          logging.info("%s: peak FLOP/s per device %.3g (%s).", stage, peak[0], peak[1])
        model_flops = 3.0 * flops_per_example * global_batch_size * steps_per_sec
        scalars["perf/mfu"] = model_flops / (peak[0] * mesh.devices.size)
    writer.write_scalars(at_step, scalars)
    if histograms:
      writer.write_histograms(at_step, histograms)
    history.clear()
    reset_timer()

  profile_steps = {int(s) for s in (config.get("profile_steps", ()) or ())}
  tracing = False
  with ckpt_lib.PreemptionFlag() as preemption, _closing(writer):
    while step < num_steps:
      if step in profile_steps and not tracing:
        trace_dir = stage_dir / "profile"
        logging.info("%s: profiling from step %d into %s.", stage, step, trace_dir)
        jax.profiler.start_trace(str(trace_dir))
        tracing = True
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        try:
          with split.timed("data"):
            local_batch = next(data_iter)
        except StopIteration:
          raise RuntimeError(
            f"{stage}: the data iterator ended at step {step} of {num_steps}; training data "
            "must repeat (grain: `.repeat()` before batching)."
          ) from None
        if not global_batch_size:
          local_size = len(jax.tree.leaves(local_batch)[0])
          global_batch_size = local_size * jax.process_count()
          sharding_lib.check_batch_divisible(global_batch_size, mesh, f"{stage} train batch")
          expected = config.get("batch_size")
          if expected and expected != global_batch_size:
            raise ValueError(
              f"{stage}: the data pipeline yields a global batch of {global_batch_size} "
              f"({local_size} per process x {jax.process_count()}), but train.batch_size is "
              f"{expected}; build the pipeline from train.batch_size // jax.process_count()."
            )
        with split.timed("compile" if step == start_step else "step"):
          batch = sharding_lib.global_batch(local_batch, mesh)
          state, metrics = train_step(state, batch, extra_args)
      if tracing and (step + 1 not in profile_steps or step + 1 == num_steps):
        jax.block_until_ready((state, metrics))  # the trace holds the device work of the step
        jax.profiler.stop_trace()
        tracing = False
      with split.timed("step"):
        check_pending()  # the previous step, while this one runs
      pending = (step, metrics)
      step += 1
      with split.timed("logging"):
        report_progress(step)

      if step == start_step + 1:  # exclude compilation from throughput
        with split.timed("compile"):
          check_pending()
        reset_timer()
      if log_every and (step % log_every == 0 or step == num_steps):
        with split.timed("step"):
          check_pending()
        with split.timed("logging"):
          write_train_metrics(step)
      if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
        with split.timed("step"):
          check_pending()
        with split.timed("eval"), report_progress.timed("eval"):
          results = eval_fn(state) or {}
        if results:
          writer.write_scalars(
            step, {k: float(v) for k, v in _named_metrics(results, "eval").items()}
          )
        reset_timer()
      preempted = preemption.requested or ckpt.reached_preemption(step)
      if step == num_steps or preempted or ckpt.should_save(step):
        with split.timed("step"):
          check_pending()
        with split.timed("checkpoint"):
          metrics_lib.save_window(stage_dir, step, history, ckpt.all_steps())
          if ckpt.save(step, state, data_iter, saved_config, force=step == num_steps or preempted):
            faults.point(f"train:{stage}:saving", step)
        reset_timer()
      faults.point(f"train:{stage}:step", step, before=ckpt.wait, collective=True)
      if preempted:
        ckpt.wait()
        writer.flush()
        logging.warning("%s: preempted; checkpoint at step %d written, exiting.", stage, step)
        raise Preempted(step)
    check_pending()
    if step > start_step:
      writer.write_scalars(step, {f"time/{k}_s": v for k, v in split.totals().items()})

  elapsed = time.perf_counter() - run_start
  done = step - start_step
  logging.info(
    "%s: done, steps %d -> %d in %.1f s (%.2f steps/s, %.1f examples/s); time split %s.",
    stage,
    start_step,
    step,
    elapsed,
    done / max(elapsed, 1e-9),
    done * global_batch_size / max(elapsed, 1e-9),
    split.format(),
  )
  return state
