# ray-wsss on Ray 2.60: the project and every dependency, so cluster nodes install nothing at run time.
#
#   GPU nodes: docker build -t ghcr.io/your-org/ray-wsss:0.1.0-gpu .
#   CPU nodes: docker build --build-arg RAY_IMAGE_VARIANT=cpu \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                -t ghcr.io/your-org/ray-wsss:0.1.0-cpu .
#
# Two stages: `build` has the C/C++ toolchain and compiles the wheels PyPI has only as source
# (pydensecrf2; pycocotools where no wheel fits); the runtime image installs those wheels and never
# sees a compiler. Needs BuildKit (the default builder since Docker 23) for RUN --mount.
ARG RAY_IMAGE_VARIANT=gpu

FROM rayproject/ray:2.60.0-py311-${RAY_IMAGE_VARIANT} AS build
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /tmp/build \
    && chown ray /tmp/build
USER ray
WORKDIR /tmp/build
COPY --chown=ray pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && grep -E '^(pydensecrf2|pycocotools)\b' requirements.txt > compiled.txt \
    && pip wheel --no-cache-dir --no-deps --wheel-dir wheels -r compiled.txt

FROM rayproject/ray:2.60.0-py311-${RAY_IMAGE_VARIANT}

# Optional index for torch/torchvision (e.g. .../whl/cpu, or .../whl/cu126 to match an older driver).
# Empty: pip keeps a torch the base image already has, else takes the PyPI build.
ARG TORCH_INDEX_URL=""
ARG APP_DIR=/home/ray/ray-wsss

USER root
RUN mkdir -p ${APP_DIR} \
    && chown ray ${APP_DIR}
USER ray
WORKDIR ${APP_DIR}

# Dependencies from pyproject.toml alone, so editing the code does not redo this layer. The build
# stage's requirements and wheels are mounted, not copied: no layer keeps them. --only-binary: the
# compiled packages must come from those wheels (there is no compiler here to build them).
# boto3: the autoscaler on the head launches EC2 nodes with it.
COPY --chown=ray pyproject.toml ./
RUN --mount=type=bind,from=build,source=/tmp/build,target=/tmp/build \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch torchvision; \
    fi \
    && pip install --no-cache-dir --find-links /tmp/build/wheels --only-binary pydensecrf2,pycocotools \
        -r /tmp/build/requirements.txt boto3

# The code: the library is installed, jobs/ stays here for `python /home/ray/ray-wsss/jobs/...`.
COPY --chown=ray README.md ./
COPY --chown=ray ray_wsss ./ray_wsss
COPY --chown=ray jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray_wsss.core.refine.crf, timm, torch, s3fs; print('ray-wsss image ok, torch', torch.__version__)"
