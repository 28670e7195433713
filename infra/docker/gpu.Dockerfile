# syntax=docker/dockerfile:1
# pairwatch GPU worker: `pairwatch watch sqs QUEUE_URL` with the VL model inside the worker (ECS on
# GPU EC2, infra/aws/template.yaml Worker=gpu) or `pairwatch watch minio s3://BUCKET/PREFIX`
# (infra/minio/docker-compose.yml, profile gpu).
#
# Build from the repository root (the build context is narrowed by gpu.Dockerfile.dockerignore),
# for the platform the template pins (and, for a registry, without a multi-entry OCI index):
#   docker build --platform linux/amd64 --provenance=false -f infra/docker/gpu.Dockerfile -t pairwatch-gpu .
#
# CUDA: torch==2.14.1's wheels are built for CUDA 13.0 and bring cuBLAS, cuDNN and NCCL with them;
# the `base` flavour adds only the runtime and the NVIDIA_REQUIRE_CUDA=cuda>=13.0 check that the
# container toolkit applies at start. CUDA 13.0 needs NVIDIA driver >= 580.65.06; the ECS GPU AMI
# the template pins (GpuAmiParameter) ships 580.178.04. Move this tag, torch's pins and the AMI
# together (tests/test_infra.py checks they agree).

FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS build
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
# The `vl` extra (torch, torchvision, transformers, xgrammar), with the same pins so that the
# extra's ranges cannot move torch.
RUN pip install --no-cache-dir "/src[vl]" torch==2.14.1 torchvision==0.29.1

FROM nvidia/cuda:13.0.2-base-ubuntu24.04
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
