# clcalib: API and worker image (one image, two commands).
# GPU workers: build with a CUDA torch wheel index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t clcalib .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLCALIB_DATA_DIR=/data \
    CLCALIB_HOST=0.0.0.0 \
    CLCALIB_PORT=8000

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 clcalib \
 && mkdir -p /data /scratch && chown clcalib /data /scratch  # a new named volume takes this owner

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY clcalib ./clcalib
COPY jobs ./jobs
COPY service ./service
COPY worker ./worker
RUN pip install -c constraints.txt --extra-index-url "${TORCH_INDEX}" torch torchvision \
 && pip install -c constraints.txt ".[postgres,onnx,openvino,s3]"

USER clcalib
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["clcalib", "serve", "--no-worker"]
