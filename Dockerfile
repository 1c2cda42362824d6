# ray-wsss on Ray 2.60: the project and every dependency, so cluster nodes install nothing at run time.
#
#   GPU nodes: docker build -t ghcr.io/your-org/ray-wsss:0.1.0-gpu .
#   CPU nodes: docker build --build-arg RAY_IMAGE_VARIANT=cpu \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                -t ghcr.io/your-org/ray-wsss:0.1.0-cpu .
ARG RAY_IMAGE_VARIANT=gpu
FROM rayproject/ray:2.60.0-py311-${RAY_IMAGE_VARIANT}

# Optional index for torch/torchvision (e.g. .../whl/cpu, or .../whl/cu126 to match an older driver).
# Empty: pip keeps a torch the base image already has, else takes the PyPI build.
ARG TORCH_INDEX_URL=""
ARG APP_DIR=/home/ray/ray-wsss

# pydensecrf2 is built from its source distribution at install time: it needs a C/C++ toolchain.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p ${APP_DIR} \
    && chown ray ${APP_DIR}
USER ray
WORKDIR ${APP_DIR}

# Dependencies from pyproject.toml alone, so editing the code does not redo this layer.
# boto3: the autoscaler on the head launches EC2 nodes with it.
COPY --chown=ray pyproject.toml ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch torchvision; \
    fi \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt boto3 \
    && rm /tmp/requirements.txt

# The code: the library is installed, jobs/ stays here for `python /home/ray/ray-wsss/jobs/...`.
COPY --chown=ray README.md ./
COPY --chown=ray ray_wsss ./ray_wsss
COPY --chown=ray jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray_wsss.core.refine.crf, timm, torch, s3fs; print('ray-wsss image ok, torch', torch.__version__)"
