# instructd on an NVIDIA GPU: upstream vLLM (CUDA) and the embedded default model.
#   docker build -t instructd .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v instructd:/data instructd
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/instructd
COPY . .
RUN scripts/install.sh --gpu
# Convert the embedded model at build time, so a container starts without converting it.
RUN .venv/bin/python -c "from instructd.server.model import default_model; from instructd.server.config import default_cache; default_model(default_cache())"

ENV INSTRUCTD_HOME=/data
VOLUME /data
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
ENTRYPOINT [".venv/bin/instructd", "serve", "--host", "0.0.0.0"]
