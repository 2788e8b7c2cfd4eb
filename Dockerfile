# moetrain for GPU clusters, on NVIDIA's NGC PyTorch image: CUDA toolkit, NCCL, apex and NVIDIA's
# CUDA build of torch inside. Build with BuildKit (Docker >= 23): docker build -t moetrain .
#
# Base: NGC PyTorch 26.03, chosen for its torch, 2.11 (NVIDIA's 2.11.0a0 build), the lowest
# torch moetrain supports and the one its GPU checks run; Python 3.12, CUDA 13, which needs an
# NVIDIA driver >= 580. The tag's torch is the "torch" line below; tests/unit/test_dockerfile.py
# holds the known tag -> torch pairs, with their sources, and checks the two agree.
# torch 2.11
ARG BASE=nvcr.io/nvidia/pytorch:26.03-py3
FROM ${BASE}

# A100 (8.0) and H100 (9.0): the archs csrc's CUDA kernels are compiled for
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0"

WORKDIR /opt/moetrain
COPY . .

# The install keeps the image's torch. pip sees NVIDIA's 2.11.0a0 as a pre-release below 2.11, so
# resolving moetrain's torch>=2.11 would fetch PyPI's torch (or fail on the image's pip
# constraints, /etc/pip/constraint.txt). So: moetrain itself with --no-deps (--no-build-isolation:
# csrc is built against the image's torch, with CUDA), then the dependencies its metadata lists
# (install_requires and the test extra; setup.py is the one list) less torch, with the installed
# torch as a constraint: a dependency that wants another torch fails the build, never replaces it.
RUN <<EOF
set -eu
work=$(mktemp -d)
python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$work/torch.txt"
pip install --no-cache-dir --no-build-isolation --no-deps -e .
python - >"$work/requirements.txt" <<'PY'
import importlib.metadata
import re

EXTRAS = {"test"}  # python -m pytest -m gpu runs in the image
wanted = []
for requirement in importlib.metadata.requires("moetrain"):
    spec, _, marker = (part.strip() for part in requirement.partition(";"))
    extra = re.fullmatch(r'extra == "([\w-]+)"', marker)
    if marker and extra is None:
        raise SystemExit(f"moetrain's requirement {requirement!r}: marker not handled here")
    name = re.match(r"[\w.-]+", spec).group().lower()
    if name != "torch" and (extra is None or extra.group(1) in EXTRAS):
        wanted.append(spec)
print("\n".join(dict.fromkeys(wanted)))
PY
pip install --no-cache-dir -c "$work/torch.txt" -r "$work/requirements.txt"
rm -rf "$work"
EOF

# csrc's CUDA kernels are compiled in and registered (checked, not run: a build has no GPU)
RUN python -c "from moetrain.ops import active_backend as a; b = a('CUDA'); print('CUDA ops:', b); \
assert b.startswith('csrc'), b"

CMD ["moetrain-train", "--help"]
