# netvlad-server image. GPU build by default; CPU build with `--build-arg VARIANT=cpu`.
#
#   docker build -t netvlad-service .                          # CUDA build of TensorFlow
#   docker build -t netvlad-service:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v "$PWD/models:/models:ro" netvlad-service
#
# Both variants start from the same slim Python image: TensorFlow's `and-cuda` extra brings CUDA
# and cuDNN as pip wheels, so the GPU image needs only the host's NVIDIA driver (injected by the
# NVIDIA Container Toolkit), not a CUDA base image with a second copy of those libraries.
#
# Weights are never part of the image: mount the folder `netvlad-models fetch` fills at /models.
# There is deliberately no silent fallback to demo weights (their descriptors mean nothing): when
# /models holds no model the server exits with the loader's message. To try the image without
# weights, run it with `-e NETVLAD_MODEL=demo`.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    NETVLAD_MODEL=/models/vd16_pitts30k_conv5_3_vlad_preL2_intra_white \
    NETVLAD_PORT=50051 \
    NETVLAD_METRICS_PORT=9090 \
    NETVLAD_INDEX_DIR=/var/lib/netvlad/indexes

WORKDIR /opt/netvlad

# Dependencies first (one cached layer, rebuilt only when pyproject.toml changes).
COPY pyproject.toml README.md scripts/image_requirements.py ./
RUN python image_requirements.py "${VARIANT}" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && rm requirements.txt image_requirements.py

COPY client ./client
COPY server ./server
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin netvlad \
    && mkdir -p /var/lib/netvlad/indexes && chown 10001 /var/lib/netvlad/indexes

# jemalloc as the C heap (docs/SERVER.md, "Host memory"): it keeps the pages a batch frees for the
# next batch, where glibc hands them back and mapping them again costs 1.2x the CPU time per batch
# of 8 at 480x640. No time-based decay: the server purges jemalloc's free pages itself after 10 s
# without a batch and after a new batch shape. oversize_threshold:0 keeps large activations out
# of the arena that returns memory at once. Linked under one path whatever the architecture, and
# set after the pip steps, so the build itself does not run with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 \
    MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1

USER 10001
# Place indexes (write-ahead logs and snapshots) persist in a volume at NETVLAD_INDEX_DIR.
VOLUME ["/models", "/var/lib/netvlad/indexes"]
EXPOSE 50051 9090

# Loading the 1.1 GB checkpoint and warming up can take minutes on a cold disk: the start period
# keeps those from counting as failures. The client's `health` exits 0 only when SERVING; the
# shell expands NETVLAD_PORT so the check follows a changed port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "exec netvlad-client --target 127.0.0.1:${NETVLAD_PORT} health"]

ENTRYPOINT ["netvlad-server"]
