# moetrain for GPU clusters, on NVIDIA's NGC PyTorch image (CUDA, NCCL, apex and a CUDA build of
# torch inside). Build: docker build -t moetrain . [--build-arg BASE=nvcr.io/nvidia/pytorch:<tag>]
#
# The install is the README's test command without its torch pin: torch==2.13.0 there is the CPU
# build for laptops and CI, and must not replace the image's CUDA torch. --no-build-isolation
# builds moetrain's C++/CUDA extension against that torch.
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0"

WORKDIR /opt/moetrain
COPY . .
RUN pip install --no-cache-dir --no-build-isolation -e ".[test,dev]" \
    && python -c "import moetrain, moetrain.ops; print(moetrain.ops.active_backend())"

CMD ["moetrain-train", "--help"]
