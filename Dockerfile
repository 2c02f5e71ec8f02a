# eft-serve on a CUDA runtime image. Build and run (see README.md, Deploy):
#   docker build -t eft-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro eft-serve:0.1.0 \
#       --config /models/family.yaml
# With no arguments the image serves the embedded demo family (on a GPU when one is visible).

# Keep the CUDA major in step with the one the pinned torch wheel from PyPI is built for:
# the wheel brings its own CUDA libraries, and this base brings a matching driver check.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's Python in a venv: no PPA, no second interpreter. Version pins on apt packages are
# left out on purpose: Ubuntu's archive drops old versions, which breaks pinned builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/eft-serve

# Dependencies first, read from pyproject.toml so the torch pin has one source, at the exact
# versions of requirements/lock.txt (what the test suite passed with); this layer (torch is most
# of the image) is rebuilt only when those two files change.
COPY pyproject.toml ./
COPY requirements/lock.txt ./requirements/lock.txt
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c requirements/lock.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY decoding ./decoding
COPY server ./server
COPY demo ./demo
COPY loadtest ./loadtest
COPY evals ./evals
RUN pip install --no-deps .

# Non-root: the server needs no privilege. uid 1001 because Ubuntu 24.04 images already
# have `ubuntu` at 1000; numeric in USER so Kubernetes' runAsNonRoot can verify it. /models
# is where families are mounted; the Hugging Face cache lives in the home directory (made
# here so a named volume mounted on it inherits the owner).
RUN useradd --create-home --uid 1001 --user-group --shell /usr/sbin/nologin eft \
    && mkdir -p /models /home/eft/.cache/huggingface \
    && chown -R eft:eft /models /home/eft/.cache
USER 1001:1001
WORKDIR /home/eft
VOLUME ["/models"]

EXPOSE 8000

# Liveness only (/health is cheap); readiness (/ready) is the orchestrator's business. The
# start period covers loading a large family. No curl in the image: Python does the GET.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Listen on all interfaces inside the container (the CLI's default is loopback, which nothing
# outside the container reaches); arguments given to `docker run` come after and may override.
ENTRYPOINT ["eft-serve", "--host", "0.0.0.0"]
CMD ["--port", "8000"]
