"""Generator train-step time: the Flax SiT/LightningDiT vs a PyTorch twin of the same network.

  python benchmarks/dit_step.py                                   # S/1 on 8x8x8 latents, batch 16
  python benchmarks/dit_step.py --variant=XL/1 --latent=16x16x32 --batch=64   # on a GPU/TPU

One flow-matching train step (`x_t = (1 - t) x + t eps`, loss `mean((v - (eps - x))^2)`, AdamW)
on the same fixed batch in both frameworks, side by side in one process. The PyTorch twin below
is plain `torch.nn` written for this benchmark only (the project never imports torch in model
code, and `diffusers` is not a dependency); it takes the Flax weights through an explicit name
map, and the script reports the forward max |difference| as a check that both run the same
network. Prints step time of each, their ratio and the JAX MFU = train FLOPs (3x the analytic
forward) / step time / peak FLOP/s of the device (`fae_jax.train.mfu.device_peak_flops`: a
measured float32 matmul on CPU, the vendor bf16 table on accelerators).

On CPU both run float32 and torch uses as many threads as the machine has cores
(`--torch-threads`; on a loaded machine OpenMP spinning makes torch far slower with more
threads than free cores, so compare on an idle machine). On an
accelerator JAX computes in bfloat16 (`--dtype`), and torch runs on CUDA under bf16 autocast
when it can, otherwise it is skipped (`--torch=cpu` forces it; slow for XL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fae_jax.models import dit, layers  # noqa: E402
from fae_jax.train import mfu  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The PyTorch twin (benchmark-only). Module names mirror the Flax parameter tree.
# ----------------------------------------------------------------------------------------------


def build_torch_dit(config: dit.DitConfig):
  """A `torch.nn.Module` computing the same function as `dit.Dit(config)` (NHWC latents)."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  c = config
  hidden = c.block_config().hidden_dim()

  def norm(dim: int) -> nn.Module:
    if c.norm == "rmsnorm":
      return nn.RMSNorm(dim, eps=c.norm_eps)
    return nn.LayerNorm(dim, eps=c.norm_eps)

  def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]

  def rotate(x, cos, sin):  # x [B, H, N, Dh]; interleaved pairs, as layers.apply_rope
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(c.width, 3 * c.width)
      self.proj = nn.Linear(c.width, c.width)
      if c.qk_norm:
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps)
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps)

    def forward(self, x, rope):
      b, n, _ = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, c.num_heads, c.head_dim).permute(2, 0, 3, 1, 4)
      if c.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
      if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
      out = F.scaled_dot_product_attention(q, k, v)
      return self.proj(out.transpose(1, 2).reshape(b, n, c.width))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1 = nn.Linear(c.width, hidden)
      self.fc2 = nn.Linear(hidden, c.width)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

  class SwiGLU(nn.Module):
    def __init__(self):
      super().__init__()
      self.w12 = nn.Linear(c.width, 2 * hidden)
      self.w3 = nn.Linear(hidden, c.width)

    def forward(self, x):
      x1, x2 = self.w12(x).chunk(2, dim=-1)
      return self.w3(F.silu(x1) * x2)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.adaLN_modulation = nn.Linear(c.width, 6 * c.width)
      self.norm1, self.norm2 = norm(c.width), norm(c.width)
      self.attn = Attention()
      self.mlp = SwiGLU() if c.ffn == "swiglu" else Mlp()

    def forward(self, x, cond, rope):
      sa, ca, ga, sf, cf, gf = self.adaLN_modulation(F.silu(cond)).chunk(6, dim=-1)
      x = x + ga[:, None] * self.attn(modulate(self.norm1(x), sa, ca), rope)
      return x + gf[:, None] * self.mlp(modulate(self.norm2(x), sf, cf))

  class Final(nn.Module):
    def __init__(self):
      super().__init__()
      self.adaLN_modulation = nn.Linear(c.width, 2 * c.width)
      self.norm_final = norm(c.width)
      self.linear = nn.Linear(c.width, c.patch_size**2 * c.out_channels)

    def forward(self, x, cond):
      shift, scale = self.adaLN_modulation(F.silu(cond)).chunk(2, dim=-1)
      return self.linear(modulate(self.norm_final(x), shift, scale))

  class TimeEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1 = nn.Linear(c.freq_dim, c.width)
      self.fc2 = nn.Linear(c.width, c.width)
      half = c.freq_dim // 2
      freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
      self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
      angles = (c.time_scale * t.float())[:, None] * self.freqs[None]
      feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
      return self.fc2(F.silu(self.fc1(feats)))

  class LabelEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding_table = nn.Embedding(c.num_classes + 1, c.width)

    def forward(self, y):
      if self.training and c.class_dropout > 0:
        drop = torch.rand(y.shape, device=y.device) < c.class_dropout
        y = torch.where(drop, torch.full_like(y, c.num_classes), y)
      return self.embedding_table(y)

  class TorchDit(nn.Module):
    def __init__(self):
      super().__init__()
      self.x_embedder = nn.Linear(c.patch_size**2 * c.in_channels, c.width)
      self.t_embedder = TimeEmbed()
      self.y_embedder = LabelEmbed()
      self.blocks = nn.ModuleList([Block() for _ in range(c.depth)])
      self.final_layer = Final()
      if c.pos_embed == "learned":
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
      elif c.pos_embed == "sincos":
        table = torch.from_numpy(dit.sincos_2d_embedding(c.grid_size, c.width))[None]
        self.register_buffer("pos_table", table, persistent=False)
      if c.rope:
        cos, sin = layers.rope_2d_tables((c.grid_size, c.grid_size), c.head_dim, theta=c.rope_theta)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def forward(self, x, t, y):  # x [B, h, w, ch] -> [B, h, w, ch]
      b, p, g = x.shape[0], c.patch_size, c.grid_size
      tokens = x.reshape(b, g, p, g, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
      h = self.x_embedder(tokens)
      if c.pos_embed == "learned":
        h = h + self.pos_embed
      elif c.pos_embed == "sincos":
        h = h + self.pos_table
      cond = self.t_embedder(t) + self.y_embedder(y)
      rope = (self.rope_cos, self.rope_sin) if c.rope else None
      for block in self.blocks:
        h = block(h, cond, rope)
      out = self.final_layer(h, cond)
      out = out.reshape(b, g, g, p, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, -1)
      return out[..., : c.in_channels]

  return TorchDit()


def load_flax_params(model, params) -> None:
  """Copies a Flax `Dit` param tree into the twin; fails on any unmatched name either side."""
  import torch

  flat = {
    "/".join(str(k.key) for k in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  state = {}
  for name, value in flat.items():
    *module, leaf = name.split("/")
    module = ".".join(m.replace("blocks_", "blocks.") for m in module)
    if leaf == "kernel":
      state[f"{module}.weight"] = value.T
    elif leaf in ("scale", "embedding"):
      state[f"{module}.weight"] = value
    elif leaf == "pos_embed":
      state["pos_embed"] = value
    else:
      state[f"{module}.{leaf}"] = value
  expected = set(model.state_dict())
  if set(state) != expected:
    raise KeyError(
      f"Flax -> torch map mismatch: unfilled {sorted(expected - set(state))}, "
      f"unused {sorted(set(state) - expected)}."
    )
  model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------


def time_interleaved(fns: dict, iters: int, warmup: int = 1) -> dict[str, float]:
  """Median wall time of each `fn()`, calls interleaved round-robin after `warmup` calls each.

  Interleaving makes both frameworks see the same background load on a shared machine.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def parse_latent(text: str) -> tuple[int, int]:
  h, w, ch = (int(v) for v in text.lower().split("x"))
  if h != w:
    raise ValueError(f"--latent needs a square grid (h == w), got {text}.")
  return h, ch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="S/1", help="S|B|L|XL / patch, e.g. XL/1")
  parser.add_argument("--latent", default="8x8x8", help="h x w x channels of the latent")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--sit", action="store_true", help="plain SiT instead of LightningDiT")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument(
    "--torch-threads", type=int, default=0, help="torch intra-op threads (0: one per core)"
  )
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  parser.add_argument("--torch", default="auto", choices=["auto", "cpu", "cuda", "skip"])
  args = parser.parse_args()

  size, channels = parse_latent(args.latent)
  config = dit.DitConfig.from_variant(
    args.variant,
    in_channels=channels,
    input_size=size,
    lightning=not args.sit,
    num_classes=args.num_classes,
  )
  device = jax.local_devices()[0]
  on_cpu = device.platform == "cpu"
  dtype_name = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
  dtype = jnp.dtype(dtype_name)

  rng = np.random.default_rng(0)
  b = args.batch
  x = rng.standard_normal((b, size, size, channels)).astype(np.float32)
  eps = rng.standard_normal((b, size, size, channels)).astype(np.float32)
  t = rng.uniform(size=(b,)).astype(np.float32)
  y = rng.integers(0, config.num_classes, size=(b,)).astype(np.int32)

  # JAX: init, then perturb so the zero-initialised layers compute something (and the parity
  # check below is not 0 == 0).
  model = dit.Dit(config, dtype=dtype)
  init = jax.jit(lambda: model.init(jax.random.key(0), x[:1], t[:1], y[:1], train=False))
  params = init()["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    treedef, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  num_params = sum(int(np.prod(p.shape)) for p in leaves)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=0.0)

  def loss_fn(p, rng):
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    v = model.apply({"params": p}, xt, t, y, train=True, rngs={"dropout": rng})
    return jnp.mean(jnp.square(v - (eps - x)))

  def step(p, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  # No donation: params are reused for the torch copy; a donated step differs by a buffer copy.
  jit_step = jax.jit(step)
  host = {"x": x, "eps": eps, "t": t, "y": y.astype(np.int64)}
  x, eps, t, y = (jax.device_put(a) for a in (x, eps, t, y))
  state = {"params": params, "opt": tx.init(params), "i": 0}

  def jax_step():
    state["params"], state["opt"], loss = jit_step(
      state["params"], state["opt"], jax.random.key(state["i"])
    )
    state["i"] += 1
    loss.block_until_ready()

  start = time.perf_counter()
  jax_step()
  compile_s = time.perf_counter() - start
  steps = {"jax": jax_step}
  result = {
    "model": f"{'SiT' if args.sit else 'LightningDiT'}-{args.variant}",
    "latent": args.latent,
    "batch": b,
    "params": num_params,
    "device": device.device_kind,
    "jax_dtype": dtype_name,
    "jax_compile_s": round(compile_s, 2),
  }

  torch_device = args.torch
  if torch_device == "auto":
    import torch

    torch_device = "cpu" if on_cpu else ("cuda" if torch.cuda.is_available() else "skip")
  if torch_device != "skip":
    import torch

    threads = args.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tmodel = build_torch_dit(config)
    load_flax_params(tmodel, params)
    tmodel = tmodel.to(torch_device)
    tx_, teps, tt, ty = (torch.from_numpy(host[k]).to(torch_device) for k in ("x", "eps", "t", "y"))
    autocast = torch.autocast(torch_device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")

    # Parity of the forward pass (evaluation mode: no label dropout), same weights.
    tmodel.eval()
    with torch.no_grad(), autocast:
      ref = tmodel(tx_, tt, ty).float().cpu().numpy()
    ours = jax.jit(lambda p: model.apply({"params": p}, x, t, y, train=False))(params)
    result["forward_max_abs_diff"] = float(np.abs(np.asarray(ours) - ref).max())
    result["forward_max_abs"] = float(np.abs(ref).max())

    tmodel.train()
    opt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    tview = tt[:, None, None, None]

    def torch_step():
      opt.zero_grad(set_to_none=True)
      with autocast:
        v = tmodel((1 - tview) * tx_ + tview * teps, tt, ty)
      loss = torch.mean(torch.square(v.float() - (teps - tx_)))
      loss.backward()
      opt.step()
      if torch_device == "cuda":
        torch.cuda.synchronize()
      return loss

    steps["torch"] = torch_step

  medians = time_interleaved(steps, args.iters)
  t_jax = medians["jax"]
  flops_step = b * dit.dit_flops_per_example(config, training=True)
  peak, peak_source = mfu.device_peak_flops(device)
  result.update(
    jax_step_s=round(t_jax, 4),
    train_gflop_per_step=round(flops_step / 1e9, 2),
    jax_tflop_per_s=round(flops_step / t_jax / 1e12, 4),
    peak_tflop_per_s=round(peak / 1e12, 4),
    peak_source=peak_source,
    jax_mfu=round(flops_step / t_jax / peak, 4),
  )
  if "torch" in medians:
    t_torch = medians["torch"]
    result.update(
      torch_device=torch_device,
      torch_threads=threads,
      torch_step_s=round(t_torch, 4),
      torch_tflop_per_s=round(flops_step / t_torch / 1e12, 4),
      torch_mfu=round(flops_step / t_torch / peak, 4),
      jax_speedup_over_torch=round(t_torch / t_jax, 3),
    )
  result["versions"] = {"jax": jax.__version__}
  if torch_device != "skip":
    result["versions"]["torch"] = torch.__version__

  print(f"{result['model']} on {args.latent} latents, batch {b}, {num_params / 1e6:.2f}M params")
  print(f"{'train step (s)':24s}{'JAX/Flax':>12s}{'PyTorch':>12s}")
  print(f"{'':24s}{t_jax:12.4f}{result.get('torch_step_s', float('nan')):12.4f}")
  if "torch_step_s" in result:
    print(f"JAX speed-up over PyTorch: {result['jax_speedup_over_torch']:.3f}x")
  print(
    f"JAX: {result['jax_tflop_per_s'] * 1e3:.1f} GFLOP/s = MFU {result['jax_mfu']:.1%} of "
    f"{result['peak_tflop_per_s'] * 1e3:.1f} GFLOP/s ({peak_source})"
  )
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
