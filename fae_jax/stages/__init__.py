"""The pipeline's stages. Each stage module defines:

  NAME: str
  is_complete(ctx: StageContext) -> bool   # True when its outputs exist in full (then skipped)
  run(ctx: StageContext) -> dict            # does the work; returns values for report.json
  check_config(config) -> None              # optional: raises ValueError on a bad value; run by
                                            # fae_jax.config_checks before any stage starts

Adding a stage = one module here plus one line in `STAGES` below.
"""

from __future__ import annotations

from fae_jax.stages import convert, diffusion, encode, evaluate, fae, flow, latents, pixel
from fae_jax.stages.context import StageContext

STAGES = {
  convert.NAME: convert,
  encode.NAME: encode,
  fae.NAME: fae,
  pixel.NAME: pixel,
  latents.NAME: latents,
  diffusion.NAME: diffusion,
  flow.NAME: flow,
  evaluate.NAME: evaluate,
}

__all__ = ["STAGES", "StageContext"]
