"""Where finished runs spent their time, in FLOPs: each train phase's analytic FLOPs and the
throughput its loop reached, run beside run.

  python benchmarks/demo_budget.py RUN_A RUN_B        # e.g. two `make demo` workdirs

For every train phase of each run (`fae`, `pixel/noisy`, `pixel/finetune`, `diffusion`, `flow`)
it reads the run's own `config.json` and prints steps x batch, the trained model's FLOPs (the
train loop's MFU convention: 3x the forward matmul FLOPs of `fae_jax.aot.build_step`, no
compile), the frozen networks' FLOPs the phase also runs (the pixel fine-tune's FAE forward on
every example, and the DINOv2 perceptual term: forward + backward to the image, counted 2x the
encoder's forward, on `perc_examples` of every `perc_every`-th step), the phase loop's seconds
(`train_log.jsonl`: `time/total_s`, or the last `uptime` of a run older than the time split) and
the rate both counts together reached in it. Below, the stages' seconds from `report.json`.

With two or more runs the last is compared with the first: the ratio of their train FLOPs, of
their loops' rates, and the rate the last run's train phases would need for the whole run to
take no longer than the first (its other stages as they were). FLOPs do not depend on the
machine, so this reads across machines and spells; the seconds and rates are those of the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # counts FLOPs and reads logs: no accelerator
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# (aot step, log directory under the run, config prefix of its train settings)
PHASES = (
  ("fae", "fae", "fae"),
  ("pixel", "pixel/noisy", "pixel.noisy"),
  ("pixel_finetune", "pixel/finetune", "pixel.finetune"),
  ("diffusion", "diffusion", "diffusion"),
  ("flow", "flow", "flow"),
)


@dataclasses.dataclass
class Phase:
  name: str
  steps: int
  batch: int
  model_flops: float  # the trained model, the MFU convention (3x forward)
  frozen_flops: float  # frozen networks run by the phase (FAE forward, perceptual DINOv2)
  seconds: float | None  # the phase loop's own time

  @property
  def flops(self) -> float:
    return self.model_flops + self.frozen_flops


def _node(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def load_config(run: pathlib.Path):
  import ml_collections

  path = run / "config.json"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} does not exist: {run} is not a run directory (python -m fae_jax.main writes "
      "config.json into its --workdir before the first stage)."
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def loop_seconds(log: pathlib.Path) -> float | None:
  """The phase loop's time: the last `time/total_s` of its train log, else its last `uptime`."""
  if not log.exists():
    return None
  total = uptime = None
  for line in log.read_text().splitlines():
    if not line.strip():
      continue
    rec = json.loads(line)
    if "time/total_s" in rec:
      total = float(rec["time/total_s"])
    if "uptime" in rec:
      uptime = float(rec["uptime"])
  return total if total is not None else uptime


def frozen_flops_per_step(step: str, config, geo) -> float:
  """FLOPs of the frozen networks one step of `step` runs besides the trained model."""
  if step not in ("pixel", "pixel_finetune"):
    return 0.0
  from fae_jax import aot
  from fae_jax.models import fae as fae_model
  from fae_jax.stages import fae as fae_stage

  p = config.pixel
  phase = "noisy" if step == "pixel" else "finetune"
  batch = int(p[phase].train.batch_size)
  out = 0.0
  if phase == "finetune":  # x_hat of every example through the frozen FAE
    out += batch * fae_model.fae_flops_per_example(fae_stage.model_config(config, geo.spec))
  loss = p.loss
  weight = float(loss.get("perc_weight", 0.0))
  if loss.get("perceptual") == "dino" and weight > 0 and phase in tuple(loss.perc_phases):
    examples = min(batch, int(loss.get("perc_examples") or batch))
    every = int(loss.get("perc_every", 1))
    encoder = aot.encoder_flops_per_example(geo, aot._encoder_params(geo))
    out += 2.0 * encoder * examples / every
  return out


def phases(run: pathlib.Path, config) -> list[Phase]:
  import jax

  from fae_jax import aot, sharding

  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
  geo = aot._geometry(config)
  out = []
  for step, log_dir, prefix in PHASES:
    train = _node(config, prefix).train
    steps = int(train.num_steps)
    if steps <= 0:
      continue
    spec = aot.build_step(step, config, mesh)
    out.append(
      Phase(
        name=log_dir,
        steps=steps,
        batch=int(spec.global_batch),
        model_flops=spec.analytic_flops * steps,
        frozen_flops=frozen_flops_per_step(step, config, geo) * steps,
        seconds=loop_seconds(run / log_dir / "train_log.jsonl"),
      )
    )
  return out


def stage_seconds(run: pathlib.Path) -> dict[str, float]:
  path = run / "report.json"
  if not path.exists():
    return {}
  return {k: float(v) for k, v in json.loads(path.read_text()).get("stage_seconds", {}).items()}


def _rate(flops: float, seconds: float | None) -> str:
  return f"{flops / seconds / 1e9:.1f}" if seconds else "-"


def run_table(run: pathlib.Path, rows: list[Phase], stages: dict[str, float]) -> str:
  lines = [
    f"{run}",
    "| train phase | steps x batch | model TFLOP | frozen TFLOP | loop s | GFLOP/s (both) |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    secs = f"{r.seconds:.1f}" if r.seconds else "-"
    lines.append(
      f"| {r.name} | {r.steps} x {r.batch} | {r.model_flops / 1e12:.1f} | "
      f"{r.frozen_flops / 1e12:.1f} | {secs} | {_rate(r.flops, r.seconds)} |"
    )
  model = sum(r.model_flops for r in rows)
  frozen = sum(r.frozen_flops for r in rows)
  secs = sum(r.seconds or 0.0 for r in rows)
  lines.append(
    f"| all train phases | | {model / 1e12:.1f} | {frozen / 1e12:.1f} | {secs:.1f} | "
    f"{_rate(model + frozen, secs)} |"
  )
  if stages:
    lines.append(
      "stages (s): "
      + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
      + f"; all {sum(stages.values()):.0f}"
    )
  return "\n".join(lines)


def compare(first: tuple[list[Phase], dict], last: tuple[list[Phase], dict]) -> dict[str, float]:
  """Train FLOPs and loop rates of `last` against `first`, and the rate `last`'s train phases
  would need for its whole run to take no longer than `first`'s."""
  (rows_a, stages_a), (rows_b, stages_b) = first, last
  flops_a = sum(r.flops for r in rows_a)
  flops_b = sum(r.flops for r in rows_b)
  secs_a = sum(r.seconds or 0.0 for r in rows_a)
  secs_b = sum(r.seconds or 0.0 for r in rows_b)
  out = {"flops_ratio": flops_b / flops_a}
  if secs_a and secs_b:
    out["rate_a_gflops"] = flops_a / secs_a / 1e9
    out["rate_b_gflops"] = flops_b / secs_b / 1e9
    out["rate_ratio"] = out["rate_b_gflops"] / out["rate_a_gflops"]
  if stages_a and stages_b and secs_b:
    other_b = sum(stages_b.values()) - secs_b  # stages and stage parts outside the train loops
    budget = sum(stages_a.values()) - other_b
    out["train_budget_s"] = budget
    out["needed_rate_gflops"] = flops_b / budget / 1e9 if budget > 0 else float("inf")
    out["needed_speedup"] = secs_b / budget if budget > 0 else float("inf")
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run directories (--workdir)")
  args = parser.parse_args(argv)
  results = []
  for run in args.runs:
    config = load_config(run)
    rows, stages = phases(run, config), stage_seconds(run)
    results.append((rows, stages))
    print(run_table(run, rows, stages), end="\n\n")
  if len(results) > 1:
    c = compare(results[0], results[-1])
    a, b = args.runs[0], args.runs[-1]
    print(f"{b} against {a}: train FLOPs x{c['flops_ratio']:.2f}", end="")
    if "rate_ratio" in c:
      print(
        f"; loop rate {c['rate_b_gflops']:.1f} vs {c['rate_a_gflops']:.1f} GFLOP/s "
        f"(x{c['rate_ratio']:.2f})",
        end="",
      )
    print()
    if "train_budget_s" in c:
      print(
        f"for the whole of {b} to take no longer than {a}, its train phases would have "
        f"{c['train_budget_s']:.0f} s: {c['needed_rate_gflops']:.1f} GFLOP/s, "
        f"x{c['needed_speedup']:.2f} their rate in this run"
      )


if __name__ == "__main__":
  main()
