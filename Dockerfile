# The workerpool image: the project installed once, run as `workerpool scheduler`,
# `workerpool worker` and `workerpool api` (see docker-compose.yml and docs/deploy.md).
#
#   docker build -t workerpool .
#
# The base is pinned by digest: python:3.11-slim-bookworm (Python 3.11.16) as recorded for
# that tag by the Docker official images (docker-library/repo-info). To move to a newer one:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # then replace the digest
# Any Debian-based image with python3 and its venv module works as a base: where no image
# registry is reachable, `ops/compose/make-base-image` makes one and the build takes it with
#   docker build --network host --build-arg BASE_IMAGE=workerpool-base:bookworm-local .
# The build needs the Python package index (pip); it plays well with the classic builder
# and BuildKit alike. No secret is ever copied in: see .dockerignore.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

# ---- build: a virtual environment with the project and its dependencies ----------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/workerpool
WORKDIR /src
# The dependencies first, read from pyproject.toml: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
    && /opt/workerpool/bin/pip install --quiet -r requirements.txt
# Then the project itself (its packages only: tests, ops and docs stay out).
COPY README.md ./
COPY cli ./cli
COPY devnet ./devnet
COPY scheduler ./scheduler
COPY workers ./workers
COPY api ./api
COPY orders ./orders
COPY pool ./pool
COPY poco ./poco
RUN /opt/workerpool/bin/pip install --quiet --no-deps . \
    && /opt/workerpool/bin/workerpool --help >/dev/null
COPY ops/compose/healthcheck.py /opt/workerpool/bin/workerpool-healthcheck
COPY ops/compose/prepare.py /opt/workerpool/bin/workerpool-prepare
RUN chmod 0755 /opt/workerpool/bin/workerpool-healthcheck /opt/workerpool/bin/workerpool-prepare

# ---- runtime: the base, the virtual environment, and an unprivileged user ---------------------
FROM ${BASE_IMAGE} AS runtime
# uid/gid 10001: docker-compose.yml, ops/compose/prepare.py and docs/deploy.md rely on it
RUN groupadd --gid 10001 workerpool \
    && useradd --uid 10001 --gid workerpool --no-create-home \
        --home-dir /var/lib/workerpool --shell /usr/sbin/nologin workerpool \
    && mkdir -p /var/lib/workerpool/worker /var/lib/workerpool/results \
    && chown -R workerpool:workerpool /var/lib/workerpool
COPY --from=build /opt/workerpool /opt/workerpool
ENV PATH=/opt/workerpool/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/workerpool \
    IEXEC_WORKER_BASE_DIR=/var/lib/workerpool/worker \
    WORKERPOOL_LOCAL_RESULTS_DIR=/var/lib/workerpool/results
LABEL org.opencontainers.image.title="workerpool" \
      org.opencontainers.image.description="iExec workerpool manager: scheduler, Celery worker nodes, status API" \
      org.opencontainers.image.licenses="Apache-2.0"
USER workerpool
WORKDIR /var/lib/workerpool
EXPOSE 18090
ENTRYPOINT ["workerpool"]
CMD ["--help"]
