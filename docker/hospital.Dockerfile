# fedclinic hospital node: `fedclinic hospital` (Flower SuperNode + the fedclinic ClientApp
# with torch, torchvision and MONAI). It dials the coordinator; nothing listens here.
#
# CPU-only site (default): torch from the PyTorch CPU index (no CUDA libraries, ~1 GB smaller)
#   docker build -f docker/hospital.Dockerfile -t fedclinic/hospital:0.1.0-cpu .
# Site with an NVIDIA GPU: PyPI's torch wheels, which bundle the CUDA runtime; the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit (see docker-compose.gpu.yml)
#   docker build -f docker/hospital.Dockerfile --build-arg TORCH_VARIANT=cuda \
#       -t fedclinic/hospital:0.1.0-cuda .
#
# Base image: pinned by exact tag and digest. The digest is the one public multi-arch
# Dockerfiles pin for python:3.11.7-slim-bookworm; it could not be checked against Docker
# Hub from where this file was written (no registry access). Check it with
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm
# and, if it differs, update it here (or build with --build-arg PYTHON_IMAGE=<tag@digest>).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:110609b2b904da7fb1226a92b6c02af5d6d599c5993f6194d1366d0d6a8a8295
FROM ${PYTHON_IMAGE}

# cpu: torch/torchvision from TORCH_INDEX_URL (the PyTorch CPU wheels, versions as pinned in
# pyproject.toml, e.g. 2.14.1+cpu); cuda: the same pins from PyPI (CUDA bundled).
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_HOME=/state/flwr \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN groupadd --gid 10001 fedclinic \
    && useradd --uid 10001 --gid fedclinic --create-home --home-dir /home/fedclinic fedclinic

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedclinic ./fedclinic
COPY server ./server
COPY client ./client
COPY strategies ./strategies
# The pins come from pyproject.toml (flwr==1.39.0, torch==2.14.1, torchvision==0.29.1, monai).
RUN if [ "${TORCH_VARIANT}" = "cpu" ]; then \
        python -m pip install --extra-index-url "${TORCH_INDEX_URL}" . ; \
    elif [ "${TORCH_VARIANT}" = "cuda" ]; then \
        python -m pip install . ; \
    else \
        echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1; \
    fi \
    && mkdir -p /state /data /config /certs /keys \
    && chown -R fedclinic:fedclinic /state

USER 10001:10001
# Mounts: the site's data read-only at /data (the hospital config's data-path points inside
# it), the config at /config/hospital.toml, ca.crt at /certs, the private key at /keys;
# site state (Flower's FLWR_HOME, personalised models) on the /state volume.
VOLUME ["/state"]
# No EXPOSE: the SuperNode dials out to the coordinator's port 9092. Its Runtime API and
# health service listen on loopback only.

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=4 \
    CMD ["python", "-m", "fedclinic.healthcheck", "127.0.0.1:9099"]

ENTRYPOINT ["fedclinic", "hospital"]
CMD ["--superlink", "coordinator:9092", \
     "--ca", "/certs/ca.crt", \
     "--key", "/keys/hospital.key", \
     "--config", "/config/hospital.toml"]
