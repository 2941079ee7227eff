# syntax=docker/dockerfile:1
# bids_cadiff BIDS App image: CUDA-enabled PyTorch, the package and its default model.
#
#   docker build --build-arg VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_cadiff/__init__.py)" \
#                -t bidscadiff/bids_cadiff:unstable .
#   docker run --rm -u "$(id -u):$(id -g)" --read-only --tmpfs /tmp --gpus all \
#              -v /path/to/bids:/data:ro -v /path/to/out:/out \
#              bidscadiff/bids_cadiff:unstable /data /out participant
#
# Base: Debian 12 (bookworm) with CPython 3.11, the same OS and Python as the project's dev and
# CI machines. Debian's apt gives mricron-data (Colin27 atlas); CUDA comes with PyPI's torch
# wheel for linux/x86_64 (the CUDA runtime, cuDNN and NCCL are pip dependencies, nvidia-*), so
# no CUDA base image is needed: the host driver is injected at run time (--gpus / --nv).
# Install steps: scripts/install.sh, the same script that `make` and .ci/run use.
FROM python:3.11-slim-bookworm

# Build-time only (no pip cache in the image, no root warnings).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/bids_cadiff

# 1. System part: Debian's mricron-data (Colin27 at /usr/share/mricron/templates).
COPY scripts/install.sh scripts/install.sh
# CADIFF_EXTRAS="": the system part leaves out chromium (only the report tests use it).
#    apt's lists, caches and downloaded .debs are not kept (the official base image's apt
#    config removes the .debs already; a base made from Debian packages may not).
RUN CADIFF_EXTRAS="" bash scripts/install.sh --system-only \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb

# 2. Python part, first pass on the package skeleton only: torch and every pinned dependency
#    land in a layer that code changes do not invalidate.
#    TORCH_VARIANT=cuda (default, the published image): the torch==X pin of constraints.txt,
#    which on PyPI is the CUDA build (the CUDA runtime comes as nvidia-* wheels).
#    TORCH_VARIANT=cpu: torch==X+cpu from PyTorch's CPU index (TORCH_INDEX_URL, default
#    https://download.pytorch.org/whl/cpu), or from a folder of wheels bound into the build
#    (TORCH_WHEELS, e.g. `podman build -v /opt/wheels:/tmp/wheels:ro --build-arg
#    TORCH_WHEELS=/tmp/wheels`); no CUDA libraries, a much smaller image. scripts/test_container.sh
#    builds this variant to test the image on machines without a GPU.
#    TORCH_SPEC overrides both, e.g. a wheel URL ("torch @ https://...") for an older CUDA release.
#    CADIFF_EXTRAS=test keeps pytest in the image, so CI tests the very image it ships.
#    triton (0.72 GB installed, a dependency of the CUDA torch) is removed in the same layer:
#    it serves torch.compile only, which the app does not use and which could not run here
#    anyway (triton and inductor compile C at run time; the image has no C compiler).
ARG TORCH_VARIANT=cuda
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ARG TORCH_WHEELS=""
ARG CADIFF_EXTRAS="test"
#    PIP_CERT_FILE: a CA bundle bound into the build for pip, on build hosts behind a TLS-inspecting
#    proxy (`podman build -v /etc/ssl/certs/ca-certificates.crt:/tmp/ca.crt:ro --build-arg
#    PIP_CERT_FILE=/tmp/ca.crt`); build time only, nothing of it stays in the image.
ARG PIP_CERT_FILE=""
COPY pyproject.toml constraints.txt README* ./
COPY bids_cadiff/__init__.py bids_cadiff/__init__.py
RUN set -eu; \
    if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi; \
    if [ -n "$TORCH_WHEELS" ]; then export PIP_FIND_LINKS="$TORCH_WHEELS"; fi; \
    case "$TORCH_VARIANT" in \
      cuda) ;; \
      cpu) pin="$(sed -n 's/^torch==//p' constraints.txt)"; \
           export TORCH_SPEC="${TORCH_SPEC:-torch==${pin%%+*}+cpu}"; \
           if [ -n "$TORCH_INDEX_URL" ] || [ -z "$TORCH_WHEELS" ]; then \
             export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; \
           fi ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac; \
    bash scripts/install.sh --python-only python3; \
    python3 -m pip uninstall -y -q triton; \
    python3 -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit((torch.version.cuda is None) == ('$TORCH_VARIANT' == 'cuda'))"

# 3. The whole package (code, default model weights in bids_cadiff/data/, tests), then the same
#    install again: dependencies are already satisfied, so only the package is reinstalled.
#    TORCH_SPEC: the torch just installed, whichever variant, so that this pass keeps it (the
#    version of its metadata: PyPI's CUDA wheel is 2.13.0, though torch.__version__ says +cu130);
#    PIP_NO_DEPS: the dependencies are step 2's (same pyproject.toml), and triton stays out.
#    chmod only where needed: a chmod of an unchanged file would copy it into this layer.
COPY . .
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi; \
    TORCH_SPEC="torch==$(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')" PIP_NO_DEPS=1 \
        bash scripts/install.sh --python-only python3 \
    && python3 -m compileall -q bids_cadiff \
    && find /opt/bids_cadiff ! -perm -a+r -exec chmod a+rX {} + \
    && find /opt/bids_cadiff -type d ! -perm -a+x -exec chmod a+rX {} + \
    && bids_cadiff --version

# Run time: any user id, read-only root filesystem. Everything the app or a library might write
# goes under /tmp ($TMPDIR; `--tmpfs /tmp` in Docker, bound from the host in Apptainer), besides
# OUTPUT_DIR and the work dir (-w). No network is needed: the model is package data.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    XDG_STATE_HOME=/tmp/.local/state \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    NILEARN_DATA=/tmp/.cache/nilearn_data \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    JOBLIB_TEMP_FOLDER=/tmp \
    DENO_DIR=/tmp/.cache/deno \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The default work dir is ./work: with cwd /tmp it lands in the writable tmpfs.
WORKDIR /tmp

# Metadata last: these change with every commit and must not invalidate the layers above.
ARG VERSION=unknown
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG IMAGE_NAME=bidscadiff/bids_cadiff
ARG CONTAINER_TAG=${IMAGE_NAME}:${VERSION}
# Read by bids_cadiff.bidsio.derivatives.container_info: GeneratedBy.Container.Tag.
ENV CADIFF_CONTAINER_TAG=${CONTAINER_TAG} \
    CADIFF_CONTAINER_REVISION=${VCS_REF}
LABEL org.opencontainers.image.title="bids_cadiff" \
      org.opencontainers.image.description="BIDS App: brain structure segmentation from T1w MRI with CA-Diff (Collaborative Anatomy Diffusion)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/bids-cadiff/bids_cadiff" \
      org.opencontainers.image.url="https://github.com/bids-cadiff/bids_cadiff" \
      org.opencontainers.image.documentation="https://github.com/bids-cadiff/bids_cadiff/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm" \
      org.opencontainers.image.ref.name="${CONTAINER_TAG}"

ENTRYPOINT ["bids_cadiff"]
