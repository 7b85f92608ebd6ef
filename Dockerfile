# tailord container. CPU variant by default; for GPU hosts build with
#   --build-arg BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 (and install python3.11 there).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MALLOC_ARENA_MAX=2 \
    TAILORD_STATE_DIR=/var/lib/tailord TAILORD_HTTP_HOST=0.0.0.0 TAILORD_HTTP_PORT=8080

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      curl dataset-fashion-mnist opencv-doc gimp-data \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tailord
COPY pyproject.toml README.md ./
COPY streamer streamer
COPY learners learners
COPY replay replay
COPY deploy deploy
COPY safefiles safefiles
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install .

RUN useradd --create-home --uid 10001 tailord \
 && mkdir -p /var/lib/tailord && chown tailord:tailord /var/lib/tailord
USER tailord
VOLUME ["/var/lib/tailord"]
EXPOSE 8080

# The admin API refuses a non-loopback bind without TAILORD_ADMIN_TOKEN: set it at run time.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tailord"]
CMD ["run"]
