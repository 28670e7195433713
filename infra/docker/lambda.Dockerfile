# syntax=docker/dockerfile:1
# pairwatch CPU Lambda: handler.app.lambda_handler with the metrics comparator, fed by the SQS
# queue of infra/aws/template.yaml (Worker=lambda). Lambda has no GPU, so torch is the CPU build.
#
# Build from the repository root and push to ECR (Lambda only runs images from ECR):
#   docker build -f infra/docker/lambda.Dockerfile -t pairwatch-lambda .
#
# The AWS base image runs the function as a non-root Lambda user and includes the Runtime
# Interface Emulator, so the same image also serves the local MinIO webhook (infra/minio/).

FROM public.ecr.aws/lambda/python:3.12.2026.10.03.13
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Installed into the image's Python (on the runtime's sys.path), not with --target: pip --target
# ignores what is already there and would fetch the CUDA torch for the package's dependency.
# The package depends on torch; the CPU wheels (PyTorch's CPU index) are ~0.2 GB instead of
# several GB of CUDA libraries. torch and torchvision pinned together.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md /tmp/src/
COPY handler /tmp/src/handler
COPY watcher /tmp/src/watcher
RUN pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src
# Settings for every deployment of this image; the template adds the per-stack ones.
ENV PAIRWATCH_COMPARATOR=metrics \
    PAIRWATCH_DEVICE=cpu \
    PAIRWATCH_LOG_FORMAT=json
CMD ["handler.app.lambda_handler"]
