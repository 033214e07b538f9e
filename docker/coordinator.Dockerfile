# fedclinic coordinator: Flower SuperLink + the fedclinic ServerApp (subprocess isolation).
#
# Subprocess isolation: the SuperLink starts its own SuperExec, which runs each ServerApp
# in a child process of this container. One container per coordinator keeps the operator's
# job to one image, one volume and two ports; the ServerApp needs the same pinned stack as
# the SuperLink anyway (it builds the model with torch), so a separate SuperExec container
# (process isolation) would add moving parts without separating anything that matters.
#
# Base image: pinned by exact tag and digest. The digest is the one public multi-arch
# Dockerfiles pin for python:3.11.7-slim-bookworm; it could not be checked against Docker
# Hub from where this file was written (no registry access). Check it with
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm
# and, if it differs, update it here (or build with --build-arg PYTHON_IMAGE=<tag@digest>).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:110609b2b904da7fb1226a92b6c02af5d6d599c5993f6194d1366d0d6a8a8295
FROM ${PYTHON_IMAGE}

# CPU wheels of torch for the coordinator: it aggregates, it does not train.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_HOME=/state/flwr \
    FEDCLINIC_CERTIFICATES=/certs/ca.crt:/certs/server.pem \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

RUN groupadd --gid 10001 fedclinic \
    && useradd --uid 10001 --gid fedclinic --create-home --home-dir /home/fedclinic fedclinic

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedclinic ./fedclinic
COPY server ./server
COPY client ./client
COPY strategies ./strategies
COPY examples ./examples
# The pins come from pyproject.toml (flwr==1.39.0, torch==2.14.1, ...).
RUN python -m pip install --extra-index-url "${TORCH_INDEX_URL}" . \
    && mkdir -p /state /certs /runs \
    && chown -R fedclinic:fedclinic /state /certs /runs /app

USER 10001:10001
VOLUME ["/state", "/certs", "/runs"]
# 9092: Fleet API (gRPC + TLS) for hospitals; 8000: Control/Runtime API (HTTPS) for operators.
EXPOSE 9092 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=6 \
    CMD ["python", "-m", "fedclinic.healthcheck", "127.0.0.1:9098"]

# Flower's own flower-superlink, through fedclinic's launcher: the same flags, a longer SQLite
# busy timeout (many hospitals lose replies without it: docs/reliability.md, "Many hospitals").
ENTRYPOINT ["python", "-m", "fedclinic.superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", \
     "--ssl-certfile", "/certs/server.pem", \
     "--ssl-keyfile", "/certs/server.key", \
     "--enable-supernode-auth", \
     "--fleet-api-address", "0.0.0.0:9092", \
     "--host", "0.0.0.0", "--port", "8000", \
     "--database", "/state/superlink.db", \
     "--disable-runtime-dependency-installation", \
     "--health-server-address", "127.0.0.1:9098"]
