"""`TarFlowConfig`: the TarFlow / STARFlow normalizing flow's configuration (`models/tarflow.py`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from fae_jax.models import layers
from fae_jax.models.config_base import LatentGridConfig

Dtype = Any

_FFNS = ("mlp", "swiglu")
_NORMS = ("layernorm", "rmsnorm")
_SCALE_PARAMS = ("softplus", "exp")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class TarFlowConfig(LatentGridConfig):
  """Shape of a TarFlow/STARFlow model. Defaults: STARFlow's class-conditional ImageNet 1.4B.

  Attributes:
    input_size: latent grid side (h = w).
    in_channels: latent channels c.
    patch_size: p (1 or 2); tokens are `p * p * c` wide, the grid `input_size / p` per side.
    width: transformer width of every block.
    deep_depth: layers of the deep (conditional, noise-side) block.
    shallow_depth: layers of each shallow block.
    num_shallow: number of shallow blocks.
    num_heads: attention heads (head dim = width / num_heads, divisible by 4 for 2-D RoPE).
    ffn: 'mlp' (GELU) or 'swiglu'.
    norm: 'layernorm' or 'rmsnorm' (block norms and the final norm of each flow block).
    mlp_ratio: FFN width multiplier (SwiGLU uses 2/3 of it, rounded up to 8).
    num_classes: class labels; index `num_classes` is the null class; 0 = unconditional.
    class_dropout: training probability of replacing a label by the null class.
    noise_sigma: std of the Gaussian noise added to the latents in training (STARFlow: 0.3);
      also the default step size of the score-based denoising after sampling.
    scale_param: 'softplus' or 'exp' map from raw output to log-scale (module docstring).
    soft_clip: c of the `c * tanh(r / c)` clip of the raw log-scale output; 0 disables it.
    norm_eps: epsilon of every norm.
    rope_theta: RoPE base frequency.
    dtype: compute dtype name: 'float32', 'bfloat16' or 'float64' (tests; needs jax x64).
    remat: rematerialise each transformer layer in the backward pass of the training forward.
  """

  input_size: int = 16
  in_channels: int = 32
  patch_size: int = 1
  width: int = 2048
  deep_depth: int = 18
  shallow_depth: int = 2
  num_shallow: int = 5
  num_heads: int = 32
  ffn: str = "mlp"
  norm: str = "layernorm"
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout: float = 0.1
  noise_sigma: float = 0.3
  scale_param: str = "softplus"
  soft_clip: float = 4.0
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    def check(name: str, value: Any, allowed) -> None:
      if value not in allowed:
        raise ValueError(f"TarFlowConfig.{name}={value!r} is not one of {tuple(allowed)}.")

    check("ffn", self.ffn, _FFNS)
    check("norm", self.norm, _NORMS)
    check("scale_param", self.scale_param, _SCALE_PARAMS)
    check("dtype", self.dtype, _DTYPES)
    if self.patch_size < 1 or self.input_size % self.patch_size:
      raise ValueError(
        f"TarFlowConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}."
      )
    if self.width % self.num_heads:
      raise ValueError(
        f"TarFlowConfig.width={self.width} is not divisible by num_heads={self.num_heads}."
      )
    if self.head_dim % 4:
      raise ValueError(
        f"TarFlowConfig: 2-D RoPE needs a head dim divisible by 4, got {self.head_dim}."
      )
    if self.deep_depth < 1 or self.shallow_depth < 1 or self.num_shallow < 0:
      raise ValueError("TarFlowConfig needs deep_depth >= 1, shallow_depth >= 1, num_shallow >= 0.")
    if self.num_tokens < 2:
      raise ValueError("TarFlowConfig: an autoregressive flow needs at least 2 tokens.")
    if self.num_classes < 0 or not 0.0 <= self.class_dropout <= 1.0:
      raise ValueError("TarFlowConfig needs num_classes >= 0 and 0 <= class_dropout <= 1.")
    if self.noise_sigma < 0 or self.soft_clip < 0:
      raise ValueError("TarFlowConfig needs noise_sigma >= 0 and soft_clip >= 0.")

  # --- derived sizes (head_dim, grid_size, num_tokens, null_class: LatentGridConfig) ----------

  @property
  def token_dim(self) -> int:
    return self.patch_size**2 * self.in_channels

  @property
  def num_dims(self) -> int:
    """D = h * w * c, the dimension of one example."""
    return self.input_size**2 * self.in_channels

  @property
  def num_prefix(self) -> int:
    """Class tokens before the deep block's sequence (1 if class-conditional)."""
    return 1 if self.num_classes > 0 else 0

  @property
  def compute_dtype(self) -> Dtype:
    return _DTYPES[self.dtype]

  @property
  def out_dtype(self) -> Dtype:
    """Dtype of the affine transform and log-determinant: at least float32."""
    return jnp.promote_types(jnp.float32, self.compute_dtype)

  def block_config(self) -> layers.BlockConfig:
    return layers.block_config_of(self)

  def flow_blocks(self) -> list[tuple[str, int, bool, bool]]:
    """`(name, depth, reversed_order, conditional)` of every flow block, data -> noise order."""
    specs = []
    for i in range(self.num_shallow):
      # Alternate away from the deep block, whose order is raster: its neighbour is reversed.
      specs.append((f"shallow_{i}", self.shallow_depth, (self.num_shallow - 1 - i) % 2 == 0, False))
    specs.append(("deep", self.deep_depth, False, self.num_classes > 0))
    return specs
