"""fae_jax: FAE (Feature Auto-Encoder, arXiv 2512.07829) in JAX/Flax, TPU-first."""

from setuptools import find_packages, setup

JAX = "0.10.2"

CONVERT = [
  # The CPU build; a bare `torch` requirement pulls a multi-GB CUDA build.
  "torch==2.13.0",
  "safetensors==0.8.0",
  "onnx==1.23.2",
]

setup(
  name="fae_jax",
  version="0.1.0",
  description="FAE: adapting pretrained visual encoders for image generation, in JAX/Flax.",
  long_description=open("README.md").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=find_packages(include=["fae_jax", "fae_jax.*"]),
  install_requires=[
    f"jax=={JAX}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    # clu's metric writers and periodic actions import tensorflow; tfds prepares ImageNet with it.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "etils==1.15.0",
    "ml-dtypes==0.6.0",
    "absl-py==2.5.1",
  ],
  extras_require={
    "convert": CONVERT,
    "test": CONVERT
    + [
      "transformers==5.23.0",
      "onnxruntime==1.32.0",
      "pytest==9.2.0",
      "pytest-xdist==3.8.0",
      "ruff==0.17.6",
      # The TPU compiler for `python -m fae_jax.aot` and tests/test_aot.py (no TPU needed): the
      # version jax[tpu]==0.10.2 pins.
      "libtpu==0.0.42.1",
    ],
    "tpu": [f"jax[tpu]=={JAX}"],
    "gpu": [f"jax[cuda12]=={JAX}"],
  },
)
