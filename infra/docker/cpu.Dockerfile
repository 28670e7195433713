# syntax=docker/dockerfile:1
# pairwatch on CPU, without torch: `pairwatch serve`, `pairwatch watch minio|sqs|poll ...` with the
# metrics comparator, or with the VL model served by an engine (PAIRWATCH_VL_BACKEND=openai,
# PAIRWATCH_VL_ENDPOINT). Used by infra/minio/docker-compose.yml and by the Fargate workers of
# infra/aws/template.yaml (Worker=fargate).
#
# Build from the repository root (the build context is narrowed by cpu.Dockerfile.dockerignore):
#   docker build --platform linux/amd64 --provenance=false -f infra/docker/cpu.Dockerfile -t pairwatch-cpu .

FROM python:3.12.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY handler /src/handler
COPY watcher /src/watcher
# The core install: no `vl` extra, so no torch (several GB) in this image.
RUN pip install --no-cache-dir /src

FROM python:3.12.12-slim-bookworm
RUN groupadd --system --gid 10001 pairwatch \
    && useradd --system --uid 10001 --gid pairwatch --create-home --home-dir /home/pairwatch pairwatch
COPY --from=build /opt/venv /opt/venv
# No credentials here: S3/SQS access comes from the task role or the environment at run time,
# the events token and engine key from PAIRWATCH_* variables or their *_FILE secrets.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAIRWATCH_DEVICE=cpu \
    PAIRWATCH_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/pairwatch
EXPOSE 8080
ENTRYPOINT ["pairwatch"]
CMD ["--help"]
