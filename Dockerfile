# The code location as an image: a Dagster gRPC code server for session_cleanup_dagster.
# The Helm chart's user-code deployment runs it; the K8sRunLauncher runs each run's worker
# (`dagster api execute_run`) in a pod from this same image. See docs/deploy.md.
#
#   docker build -t session-cleanup-dagster:0.1.0 .
#
# Pinned: the base image by tag (pin it by digest in your registry mirror), every Python
# package by constraints.txt.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/session-cleanup

# Dependencies first, so a code change does not reinstall them. The k8s extra adds
# dagster-k8s: run workers load the instance, whose run launcher is the K8sRunLauncher.
COPY pyproject.toml constraints.txt README.md ./
COPY session_cleanup_dagster ./session_cleanup_dagster
COPY workspace.yaml ./
RUN pip install --no-cache-dir -c constraints.txt ".[k8s]"

# An unprivileged user with a fixed uid, so a pod securityContext can require it.
RUN groupadd --system --gid 10001 dagster \
    && useradd --system --uid 10001 --gid dagster --no-create-home \
       --shell /usr/sbin/nologin dagster
USER 10001:10001

EXPOSE 3030
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "3030"]

# The chart overrides this with dagsterApiGrpcArgs or codeServerArgs; the default is the same
# server for `docker run`.
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "3030", \
     "-m", "session_cleanup_dagster.definitions", \
     "--location-name", "session_cleanup_dagster"]
