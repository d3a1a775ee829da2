"""magi_jax: MAGI-1 (chunk-causal autoregressive video diffusion) in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="magi_jax",
    version="0.1.0",
    description="MAGI-1 autoregressive video world model in JAX/Flax: parity with the official "
                "weights, training, and device-mesh scale-out",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["magi_jax", "magi_jax.*", "experiments", "experiments.*"]),
    install_requires=[
        # CPU JAX by default; see the README for the TPU / CUDA builds.
        "jax>=0.7.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "einops>=0.8.0",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "absl-py>=2.1.0",
        "chex>=0.1.90",
        "ml_collections>=1.0.0",
        "safetensors>=0.5.0",
        "ml_dtypes>=0.5.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        # Text path: the T5 tokenizer and the official caption cleaner (ftfy pinned as the
        # official code pins it: its fixes change the cleaned prompt).
        "sentencepiece>=0.2.0",
        "ftfy==6.2.0",
        "beautifulsoup4>=4.13.4",
        # Video / image I/O: imageio-ffmpeg ships its own ffmpeg binary (no system ffmpeg).
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5.1",
        "pillow>=10.0",
        # Training: TensorBoard event files without TensorFlow, and the loss-curve plot.
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
        # zstd-compressed official shards (`<shard>.zst`).
        "convert": ["zstandard>=0.22"],
        # `python -m magi_jax.aot`: compiles for TPU topologies on any machine through libtpu.
        # jax[tpu] pins the libtpu and jaxlib builds that match its own jax version.
        "aot": ["jax[tpu]"],
    },
)
