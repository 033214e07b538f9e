# fedclinic hospital node: Flower SuperNode + the fedclinic ClientApp (torch, torchvision, MONAI).
#
# Build for a CPU-only site:   docker build -f docker/hospital.Dockerfile --build-arg TORCH_VARIANT=cpu .
# Build for a site with a GPU: docker build -f docker/hospital.Dockerfile --build-arg TORCH_VARIANT=cuda .
# (the cuda variant takes PyPI's torch wheels, which bundle the CUDA runtime; the host needs
# only the NVIDIA driver and the container toolkit, see docker-compose.gpu.yml).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu

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
        python -m pip install --extra-index-url https://download.pytorch.org/whl/cpu . ; \
    elif [ "${TORCH_VARIANT}" = "cuda" ]; then \
        python -m pip install . ; \
    else \
        echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1; \
    fi \
    && mkdir -p /state /data /config /certs \
    && chown -R fedclinic:fedclinic /state

USER 10001:10001
# The site's data is mounted read-only at /data; site state (personalised models) at /state.
VOLUME ["/state"]
# No inbound port: the SuperNode dials the coordinator. Its health service stays on loopback.

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=4 \
    CMD ["python", "-m", "fedclinic.healthcheck", "127.0.0.1:9099"]

ENTRYPOINT ["flower-supernode"]
CMD ["--root-certificates", "/certs/ca.crt", \
     "--superlink", "coordinator:9092", \
     "--auth-supernode-private-key", "/keys/hospital.key", \
     "--node-config", "/config/hospital.toml", \
     "--health-server-address", "127.0.0.1:9099"]
