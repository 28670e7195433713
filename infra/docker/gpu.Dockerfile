# syntax=docker/dockerfile:1
# pairwatch GPU worker: `pairwatch watch sqs QUEUE_URL` (ECS, infra/aws/template.yaml) or
# `pairwatch watch minio s3://BUCKET/PREFIX` (infra/minio/docker-compose.yml).
#
# Build from the repository root (the build context is narrowed by gpu.Dockerfile.dockerignore):
#   docker build -f infra/docker/gpu.Dockerfile -t pairwatch-gpu .
#
# The `base` flavour of the CUDA image carries the CUDA runtime (cudart) and the driver hooks
# the NVIDIA container toolkit needs; cuBLAS, cuDNN and NCCL come with torch's own wheels, so
# the larger `runtime` flavour would only add a second, unused copy of them.

FROM nvidia/cuda:12.9.1-base-ubuntu24.04 AS build
# Ubuntu's own python3 (3.12) is enough; apt package versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
# torch and torchvision pinned together (an unpinned torchvision drags in another torch), in
# their own layer so that code changes do not download them again.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md /src/
COPY handler /src/handler
COPY watcher /src/watcher
RUN pip install --no-cache-dir /src

FROM nvidia/cuda:12.9.1-base-ubuntu24.04
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pairwatch \
    && useradd --system --uid 10001 --gid pairwatch --create-home --home-dir /home/pairwatch pairwatch \
    && install -d -o 10001 -g 10001 /cache
COPY --from=build /opt/venv /opt/venv
# HF_HOME on the /cache volume: the model is downloaded once per volume (per ECS instance),
# not once per container. Point PAIRWATCH_MODEL at a folder to use a pre-downloaded model
# (see infra/README.md). No credentials here: AWS access comes from the task role or the
# environment at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    PAIRWATCH_DEVICE=cuda \
    PAIRWATCH_LOG_FORMAT=json
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/pairwatch
ENTRYPOINT ["pairwatch"]
CMD ["--help"]
