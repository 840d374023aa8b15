# One image for the API and the GPU workers of docker-compose.yml (nginx runs from its own image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPARSEGPT_DATA_DIR=/data HF_HOME=/hf-cache

WORKDIR /srv/sparsegpt
# Every version from the lock (requirements/lock.txt, `scripts/lock` upgrades it); torch first (the
# default Linux wheel carries its CUDA libraries, whose versions the lock pins), then the service.
COPY requirements ./requirements
RUN pip install -c requirements/lock.txt "torch==2.13.0"
COPY pyproject.toml README.md* ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
COPY alembic.ini ./
# The eval extra (lm-evaluation-harness) for the workers' zero-shot tasks; their data lands in HF_HOME.
RUN pip install -c requirements/lock.txt ".[eval,s3]" && useradd --create-home --uid 1000 sparsegpt \
    && mkdir -p /data /hf-cache && chown sparsegpt /data /hf-cache
USER sparsegpt
EXPOSE 8000
CMD ["sparsegpt", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
