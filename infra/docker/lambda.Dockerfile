# syntax=docker/dockerfile:1
# pairwatch CPU Lambda: handler.app.lambda_handler fed by the SQS queue of
# infra/aws/template.yaml (Worker=lambda), with the metrics comparator, or with the VL model served
# by the template's vLLM engine (Engine=vllm, PAIRWATCH_VL_BACKEND=openai).
#
# Build from the repository root and push to ECR (Lambda runs images from ECR only), for the
# architecture the template pins and as a single image manifest: Lambda rejects the multi-entry
# OCI index that newer builders make by default for provenance attestations.
#   docker build --platform linux/amd64 --provenance=false -f infra/docker/lambda.Dockerfile -t pairwatch-lambda .
#
# The AWS base image runs the function as a non-root Lambda user and includes the Runtime
# Interface Emulator, so the image can also be run locally (infra/README.md).

FROM public.ecr.aws/lambda/python:3.12.2026.10.03.13
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /tmp/src/
COPY handler /tmp/src/handler
COPY watcher /tmp/src/watcher
# Installed into the image's Python (on the runtime's sys.path), not with --target. The core
# install only: no `vl` extra, so no torch.
RUN pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src
# Settings for every deployment of this image; the template adds the per-stack ones.
ENV PAIRWATCH_COMPARATOR=metrics \
    PAIRWATCH_DEVICE=cpu \
    PAIRWATCH_LOG_FORMAT=json
CMD ["handler.app.lambda_handler"]
