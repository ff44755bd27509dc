# The teacher server as a container image: `docker build -t distill-teacher .`
# (No `# syntax=` line: BuildKit would pull its frontend from Docker Hub, which an air-gapped
# build cannot reach; the built-in one reads this file, and so does the legacy builder.)
#
# Offline, from a wheelhouse (no package index reached during the build; docs/deploy/README.md):
#   scripts/fill_wheelhouse.sh && docker build --build-arg PIP_OFFLINE=true -t distill-teacher .
#
# CPU by default. For CUDA, build against a PyTorch index that publishes the pinned torch (see
# constraints.txt) for your CUDA version (cu128 below is an example: PyTorch publishes each
# release for a few CUDA versions only), and optionally another base image:
#   docker build -t distill-teacher:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t distill-teacher:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The CUDA torch wheels bring NVIDIA's CUDA libraries as pip packages, so the default slim base
# works on a GPU host too (it needs the NVIDIA driver and Container Toolkit: `docker run --gpus all`).
# A base without Python (nvidia/cuda) gets its distribution's python3 (3.10 on Ubuntu 22.04, 3.12
# on 24.04); torch==2.13.0 must have wheels for that Python and CUDA. docs/deploy/README.md says
# what was and was not tested.
#
# Runs as uid 10001. Models live in the /models volume; on first start an empty volume gets the
# default MNIST teacher trained into it (~30 s on 2 idle cores, 90 s measured on a busy machine),
# hence the healthcheck's 5-minute start period (a success inside it counts at once).

ARG BASE_IMAGE=python:3.11-slim

# ---- the Python both stages share (the venv's interpreter path must be the same in both) ----
FROM ${BASE_IMAGE} AS python-base
# Only on bases without Python; the distribution's python3 is whatever version the base ships.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---- builder: a venv with the project and its pinned dependencies ----
FROM python-base AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# true: install from wheelhouse/ only (filled by scripts/fill_wheelhouse.sh), no index reached.
ARG PIP_OFFLINE=false
# pip reads its sources from these: online, the package index plus the torch index; offline
# (PIP_NO_INDEX=true), the wheelhouse alone. wheelhouse/ always exists (its README is tracked), so
# an online build copies just that README. Online, the torch index is an extra index: its local
# versions (2.13.0+cpu, +cuXXX) sort above PyPI's 2.13.0 and win.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INDEX=${PIP_OFFLINE} \
    PIP_FIND_LINKS=/wheelhouse \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, in its own layer: the largest download, unchanged by source edits.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch
# Then the other dependencies, in a layer that only pyproject.toml and constraints.txt change:
# installed through a stand-in project (empty packages, empty README), which is then removed.
COPY pyproject.toml ./
RUN mkdir protocol teacher_server student_client && touch README.md \
    && pip install -c constraints.txt . && pip uninstall -y distill-teacher \
    && rm -rf protocol teacher_server student_client README.md build ./*.egg-info
# The project itself: a source edit rebuilds from here (seconds).
COPY README.md ./
COPY protocol ./protocol
COPY teacher_server ./teacher_server
COPY student_client ./student_client
RUN pip install --no-deps -c constraints.txt . \
    && pip check

# ---- runtime: the venv, a non-root user, nothing else ----
FROM python-base AS runtime
RUN groupadd --gid 10001 teacher \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/teacher \
        --shell /usr/sbin/nologin teacher \
    && mkdir -p /models /app/runs \
    && chown 10001:10001 /models /app /app/runs
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/teacher \
    TEACHER_HOST=0.0.0.0 \
    TEACHER_MODEL_REPOSITORY=/models
WORKDIR /app
# Declared after the chown: a new named volume starts as a copy of /models, owned by 10001.
VOLUME /models
USER 10001:10001
EXPOSE 50051 8000
# Readiness over HTTP with the standard library (no curl in slim): follows TEACHER_HTTP_PORT,
# speaks https when TEACHER_TLS_CERT_FILE is set (unverified: it is this container's own server),
# ignores proxy variables. /readyz needs no token. Any exception exits 1 = unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os,ssl,urllib.request as u; t=os.environ.get('TEACHER_TLS_CERT_FILE'); u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ssl._create_unverified_context())).open(('https' if t else 'http') + '://127.0.0.1:' + os.environ.get('TEACHER_HTTP_PORT', '8000') + '/readyz', timeout=3)"]
# SIGTERM: readiness turns false, in-flight requests finish (TEACHER_SHUTDOWN_GRACE_S), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["teacher-server"]
CMD ["serve"]
