# The GPU image for csl-train: what `cluster/ray` and `cluster/k8s` run on every Ray node.
#
# Why this base: the Ray image is what KubeRay and `ray up` expect (the `ray` user with home
# /home/ray, Python and pip on PATH, `ray` itself, wget for KubeRay's probes), and its Ray
# version must equal the one pinned in pyproject.toml: a head and workers of different Ray
# versions refuse to form a cluster. `-py311` matches `requires-python`; `-cu128` is the CUDA
# user-space of the base and matches the PyTorch wheel index below (the torch wheel carries
# its own CUDA libraries, but one CUDA minor across base and wheel avoids two copies that
# disagree; nodes need an NVIDIA driver new enough for CUDA 12.8, i.e. >= 570).
#
# Pinned by tag, not digest: the digest cannot be read on the machine this file was written
# on (no registry access for images). Pin it where the image is built:
#   docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128   # -> sha256:...
# and write FROM rayproject/ray:2.60.0-py311-cu128@sha256:<that>. tests/test_cluster_static.py
# accepts either form and checks the version parts against pyproject.toml.
#
# Layer order: heavy, rarely changing layers first. torch (~3 GB) depends on nothing of
# ours; the other dependencies depend on pyproject.toml only; the code comes last and is
# installed with --no-deps, so editing trainer/ rebuilds a layer of a few hundred kB.
#
# Build and check:
#   docker build -t csl-train:0.1.0 .
#   docker run --rm csl-train:0.1.0 csl --help

FROM rayproject/ray:2.60.0-py311-cu128

# torchvision's minor is torch's + 15 (2.14 <-> 0.29); both come from the CUDA index so pip
# never swaps in a CPU or differently built wheel from PyPI.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# No credentials here or in any ARG: S3 keys reach pods from a Kubernetes Secret
# (cluster/k8s/README.md) or the nodes' own identity, never from the image.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The Ray image already runs as `ray`; saying so keeps every install below in the user's
# conda env (/home/ray/anaconda3), never as root.
USER ray
WORKDIR /home/ray/csl-train

# 1. PyTorch with CUDA: the largest layer, independent of this project's files.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch; assert torch.version.cuda, 'a CPU build of torch was installed'"

# 2. Everything else the project needs (timm among them), read from pyproject.toml alone. DeepSpeed goes first without build isolation so that its setup.py
#    sees the torch above (as the Makefile does locally); DS_BUILD_OPS=0 because the engine
#    uses torch optimizers and needs no compiled DeepSpeed ops (the base has no nvcc).
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users cluster/docker/requirements_from_pyproject.py /tmp/requirements_from_pyproject.py
RUN python /tmp/requirements_from_pyproject.py pyproject.toml > /tmp/requirements.txt \
 && DS_BUILD_OPS=0 pip install --no-build-isolation $(grep '^deepspeed' /tmp/requirements.txt) \
 && pip install -r /tmp/requirements.txt \
 && python -c "import torch, torchvision, timm, deepspeed, ray; assert torch.version.cuda"

# 3. The code: small, changes often, installed without touching the dependencies.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users data_shards ./data_shards
COPY --chown=ray:users trainer ./trainer
RUN pip install --no-deps . && csl --help > /dev/null

# `csl --help` imports no torch/ray (cli.py keeps heavy imports inside commands): a cheap
# liveness check for `docker run`; Kubernetes ignores HEALTHCHECK and uses KubeRay's probes.
HEALTHCHECK --interval=60s --timeout=20s --start-period=10s --retries=3 \
    CMD csl --help > /dev/null || exit 1

LABEL org.opencontainers.image.title="csl-train" \
      org.opencontainers.image.description="Class-aware Selective Loss training on Ray Train + DeepSpeed (GPU)" \
      org.opencontainers.image.version="0.1.0"

USER ray
