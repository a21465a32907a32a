# pylb container image (issue 11 §4).
#
#   docker build -t pylb:0.1.0 .
#   docker run --rm -p 8080:8080 pylb:0.1.0 serve --host 0.0.0.0 --backend http://vllm:8000
#
# Two stages: `build` compiles the wheel (C++ core: g++, CMake from PyPI through
# scikit-build-core, xxHash and OpenBLAS headers) and installs it with the `k8s` and `epp` extras into a
# virtual environment; `runtime` is python-slim with only the shared libraries the compiled core
# and NumPy load (tests/test_k8s_manifests.py checks them against the built extension), that
# environment copied in, and a non-root user. The root file system can be mounted read-only
# (no byte-code is written; /tmp is the only scratch space pylb may use).

ARG PYTHON_VERSION=3.12
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libxxhash-dev libopenblas-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY csrc ./csrc
COPY pylb ./pylb
RUN python -m venv /opt/pylb \
 && /opt/pylb/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/pylb/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/pylb/bin/pip install --no-cache-dir "$(ls /wheels/pylb-*.whl)[k8s,epp,tokenizer]"

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0-pthread libssl3 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pylb
COPY --from=build /opt/pylb /opt/pylb
ENV PATH=/opt/pylb/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYLB_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["pylb"]
CMD ["serve", "--config", "/etc/pylb/pylb.yaml"]
