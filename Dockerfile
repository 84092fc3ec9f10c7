# seg: batch prediction and the HTTP service on ONNX Runtime, with the bundled model. No torch.
#
#   docker build -t seg .                                   # CPU
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 -t seg:gpu .
#                                                            # GPU: CUDA 13 + cuDNN 9; run with --gpus all
#   docker build --build-arg EXTRAS=cluster -t seg:ray .      # with Ray: also a Ray node (--entrypoint ray)
#
#   docker run -p 3000:3000 seg                              # the service on 0.0.0.0:3000 (SEG_HOST, SEG_PORT)
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/in:/in:ro" -v "$PWD/out:/out" seg predict /in --out /out
#
# Training is not in the image: train with `pip install 'seg[train]'`, export ONNX, then mount the model
# and set SEG_MODEL (see docs/containers.md).

# A base with CUDA (NVIDIA's images set CUDA_VERSION) gets ONNX Runtime's CUDA build, any other the CPU build.
ARG BASE_IMAGE=debian:bookworm-slim

# The base both stages share: the system Python, nothing else.
FROM ${BASE_IMAGE} AS python
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/seg
WORKDIR /src
COPY pyproject.toml README.md ./
# The core requirements from pyproject.toml, and those of the extras named in EXTRAS (comma-separated, e.g.
# distributed), with the ONNX Runtime build for this base (CPU: 60 MB, CUDA: 340 MB), installed before the
# code so that code changes keep this layer.
ARG EXTRAS=""
# hadolint ignore=DL3013
RUN /opt/seg/bin/python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + [d for e in os.environ['EXTRAS'].split(',') if e for d in p['optional-dependencies'][e]]; print('\n'.join(d for d in deps if not d.startswith('onnxruntime')))" > /tmp/requirements.txt \
 && /opt/seg/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt "onnxruntime${CUDA_VERSION:+-gpu}>=1.27"
COPY seg ./seg
COPY training ./training
COPY serving ./serving
RUN test -f seg/assets/model.onnx \
 && /opt/seg/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/seg/bin/pip uninstall -y --disable-pip-version-check pip setuptools \
 && /opt/seg/bin/seg --help > /dev/null

FROM python
COPY --from=build /opt/seg /opt/seg
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin seg
# BentoML keeps its state under BENTOML_HOME: /tmp, so the image also runs with --read-only --tmpfs /tmp.
ENV PATH=/opt/seg/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    SEG_HOST=0.0.0.0 \
    SEG_PORT=3000
USER 10001:10001
WORKDIR /tmp
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('SEG_PORT', '3000'), timeout=4)"]
ENTRYPOINT ["seg"]
CMD ["serve"]
