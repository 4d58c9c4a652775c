"""bitdance-jax: BitDance (binary-token autoregressive image generation) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="bitdance-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of BitDance (arXiv 2602.14041)",
    packages=find_packages(include=["bitdance_jax", "bitdance_jax.*"]),
    package_data={"bitdance_jax": ["configs/*.py"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": [
        "bitdance-train = bitdance_jax.train.cli:main",
        "bitdance-sample = bitdance_jax.c2i.cli:main",
        "bitdance-t2i = bitdance_jax.t2i.cli:main",
        "bitdance-port = bitdance_jax.porting.cli:main",
        "bitdance-tokenize = bitdance_jax.tokenizer.cli:main",
        "bitdance-compile = bitdance_jax.compile:main",
    ]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "numpy",
        "pillow",
        "ml_collections",
        "safetensors",
        "tqdm",
        "scikit-learn",
        "tokenizers",
        "tensorboardX",
        # hf:owner/name ids (bitdance_jax.hub)
        "huggingface_hub>=0.26",
        "filelock",
        # weight-only int8/fp8 inference (bitdance_jax.nn.quant)
        "qwix>=0.1.8",
    ],
    extras_require={
        # Reading PyTorch .pt checkpoints (porting tool only). Pin to the CPU build.
        "torch": ["torch==2.13.0"],
        "tpu": ["jax[tpu]"],
        # python -m bitdance_jax.demo
        "demo": ["gradio>=5"],
        "gpu": ["jax[cuda12]"],
        "test": ["pytest", "pytest-xdist>=3.5", "jax[tpu]", "torch==2.13.0", "transformers", "gradio>=5", "selenium>=4.10"],
    },
)
