"""FAE on ImageNet 256x256 with DINOv2-g/14, the paper's configuration (../shared/PAPER.md).

  python -m fae_jax.main --config=configs/imagenet.py --workdir=gs://bucket/fae/run1
  python -m fae_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/fae   # smoke run
  python -m fae_jax.main --config=configs/imagenet.py:stage=diffusion --workdir=gs://bucket/fae/run1

Every stage runs by default, in order: convert, encode, fae, pixel, latents, diffusion, flow,
evaluate (each skipped when complete, resumable). Presets after the colon: `runlocal` (tiny
batch/steps for a smoke run on one host); `stage=<name>` runs that one stage against an existing
workdir (its inputs from the same workdir, or from `--config.upstream_workdir`).
The encoder weights come from a DINOv2-g/14 checkpoint the user provides
(`--config.encoder.source=/path/dinov2_vitg14_pretrain.pth` or a HF `model.safetensors`).
"""

from configs import common
from fae_jax.flow_matching import guidance


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, stage="")
  config = common.base_config()
  config.name = "imagenet256"
  config.stages = common.PIPELINE
  config.fae.dtype = "bfloat16"
  # The paper's 170.43M feature decoder has no output projection: the final RMSNorm output is
  # x_hat, which suits the per-token standardised `no_affine` targets (README, design notes).
  config.fae.model.decoder_out_proj = False
  # FSDP over 16 chips: a whole torus plane of v5p:4x4x4 and a whole axis of v5e:16x16 (on
  # v6e:8x8 it splits an axis; `sharding.make_mesh` builds it and says so). With it the train
  # state of every ImageNet model is under 1.4 GiB per chip; the compiled steps' bytes per chip
  # on v5p-64, v5e-256 and v6e-64 are in the README (`python -m fae_jax.aot`).
  config.mesh.fsdp = 16

  # DINOv2-g/14 without registers; 256 px images resized to 224 px -> 16x16 tokens of 1536.
  config.encoder.variant = "g/14"
  config.encoder.source = ""  # path to the PyTorch / safetensors checkpoint (required)
  config.encoder.image_size = 224
  config.encoder.features = "no_affine"
  config.encoder.dtype = "bfloat16"

  config.data.name = "tfds:imagenet2012"
  config.data.data_dir = None
  config.data.image_size = 256  # ADM centre crop
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.num_workers = 16
  # Each host reads whole feature-cache shards of its own (~1 TB cache over 16+ hosts: stage
  # them on local disk); README "Data at scale".
  config.data.process_split = "shard"

  config.encode.batch_size = 1024
  config.encode.examples_per_shard = 10000

  # Pixel decoder ViT-L/16 (256 px out), the encoder run inside the step (it is needed anyway for
  # the DINOv2 perceptual loss), L1 + DINOv2 feature matching + adaptive-weight PatchGAN.
  config.pixel.input = "encoder"
  config.pixel.dtype = "bfloat16"

  # LightningDiT-XL/1 computes in bfloat16 like the other ImageNet models (float32 master weights).
  config.diffusion.dtype = "bfloat16"

  # Flow generator (stage `flow`): STARFlow's 1.4B layout on the
  # 16x16x32 latents (common.py defaults), bfloat16 compute, each layer rematerialised.
  config.flow.dtype = "bfloat16"
  config.flow.model.remat = True
  config.evaluate.generators = ("diffusion", "flow")

  # Evaluation, the paper's protocol (PAPER.md): FID-50K, i.e. 50 samples per class per setting,
  # 250 sampler steps, Euler-Maruyama SDE without guidance, Euler ODE with the three guidance
  # bands with guidance (0.9 on t in [0.9, 1], 1.7 on [0.7, 0.9], 2.5 on [0, 0.7]; t = 1 noise).
  # Sampling is split into shards of 1000 over all hosts and resumes after preemption. For the
  # ADM table add --config.evaluate.inception_dir=... --config.evaluate.reference_npz=...
  # (README "FID-50K of a trained run").
  e = config.evaluate
  e.num_samples = 50_000
  e.batch_size = 256
  e.samples_per_shard = 1000
  e.unguided.method, e.unguided.num_steps, e.unguided.bands = "euler_maruyama", 250, ()
  e.guided.method, e.guided.num_steps = "euler", 250
  e.guided.bands = guidance.paper_main(1.7)

  if args.runlocal:
    config.mesh.fsdp = 1  # one host: pure data parallelism over its devices
    config.data.max_train_examples = 256
    config.data.max_eval_examples = 64
    config.encode.batch_size = 16
    config.encode.examples_per_shard = 128
    config.data.num_workers = 0
    config.fae.train.num_steps = 20
    config.fae.train.batch_size = 16
    config.fae.train.warmup_steps = 2  # the default 1000 exceeds the 20 steps: cosine refuses
    config.fae.train.log_every = 5
    config.fae.train.checkpoint_every = 10
    config.fae.eval.max_examples = 64
    config.fae.eval.probe_train_examples = 256
    for phase in (config.pixel.noisy, config.pixel.finetune):
      phase.gan_start = 5
      phase.train.num_steps = 10
      phase.train.batch_size = 16
      phase.train.warmup_steps = 2
      phase.train.log_every = 5
      phase.train.checkpoint_every = 10
    config.pixel.eval.max_examples = 64
    f = config.flow
    f.model.width, f.model.num_heads, f.model.deep_depth, f.model.num_shallow = 64, 2, 2, 1
    f.train.num_steps, f.train.batch_size, f.train.warmup_steps = 10, 16, 2
    f.train.log_every, f.train.checkpoint_every = 5, 10
    d = config.diffusion
    d.model.variant = "S/1"
    d.train.num_steps, d.train.batch_size, d.train.log_every, d.train.checkpoint_every = (
      10,
      16,
      5,
      10,
    )
    e = config.evaluate
    e.num_samples, e.batch_size, e.probe_train_examples = 32, 16, 256
    e.unguided.num_steps = e.guided.num_steps = 4
  common.apply_stage_preset(config, args.stage)
  return config


# Ablations (launch/sweep.py), PAPER.md: adapter depth and latent channels.
sweep_stages = common.sweep_stages
sweep = common.sweep
