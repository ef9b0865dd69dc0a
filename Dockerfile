# The Iterative Refinement Engine image: flow-run pods of the irefine-aks pool (prefect.yaml,
# deployment refine-aks) and the Dask scheduler and workers of DaskClusterBlock(kind="kubernetes")
# run it. Build: az acr build -r <registry> -t irefine:<version> .   (docs/aks.md)
# Dependencies come pinned from requirements.lock (scripts/lock_requirements.py), no resolution here.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The build backend stays in this stage's system Python; /opt/venv gets only the runtime.
RUN python -m venv /opt/venv \
    && python -m pip install --no-cache-dir hatchling==1.33.0
WORKDIR /src
# Dependencies first: this layer is reused until the lock changes.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY flows ./flows
COPY blocks ./blocks
COPY deployments ./deployments
COPY irefine ./irefine
RUN python -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
ARG IREFINE_UID=10001
LABEL org.opencontainers.image.title="iterative-refinement-engine" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${IREFINE_UID}" irefine \
    && useradd --system --uid "${IREFINE_UID}" --gid irefine --home-dir /opt/irefine --no-create-home \
       --shell /usr/sbin/nologin irefine
COPY --from=build /opt/venv /opt/venv
# prefect.yaml's refine-aks pull step changes to /opt/irefine and loads flows/refine.py from there.
WORKDIR /opt/irefine
COPY --chown=irefine:irefine prefect.yaml pyproject.toml ./
COPY --chown=irefine:irefine engine ./engine
COPY --chown=irefine:irefine flows ./flows
COPY --chown=irefine:irefine blocks ./blocks
COPY --chown=irefine:irefine deployments ./deployments
COPY --chown=irefine:irefine irefine ./irefine
# Writable homes on an emptyDir or the container's own layer: the root filesystem may be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/irefine \
    PREFECT_HOME=/tmp/irefine/prefect \
    IRE_HOME=/tmp/irefine/ire \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
USER 10001:10001
# A pod that cannot import the flow, the Dask worker or the operator client is broken: say so early.
# (Kubernetes ignores HEALTHCHECK; the manifests carry their own probes.)
HEALTHCHECK --interval=60s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import flows.refine, distributed, dask_kubernetes.operator, prefect_kubernetes"]
CMD ["python", "-m", "prefect", "version"]
