# The Lookalike services (worker, indexer, CLI) in one image.
# torch from PyPI carries CUDA, so the same image runs the worker on CPU or on a GPU.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY lookalike lookalike
COPY control control
COPY producers producers
COPY workers workers
COPY indexer indexer
COPY onehop onehop
COPY training training
COPY feedback feedback
COPY benchmarks benchmarks
COPY gateway gateway
RUN pip install . && apt-get purge -y build-essential && apt-get autoremove -y
RUN useradd --create-home --uid 10001 lookalike && mkdir -p /models /var/lib/lookalike /secrets \
    && chown lookalike /models /var/lib/lookalike /secrets && chmod 0700 /secrets
USER lookalike
CMD ["lookalike", "--help"]
