FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY genline genline
COPY config config
COPY storage storage
COPY provider provider
COPY pipelines pipelines
COPY tasks tasks
COPY workers workers
COPY cli cli
RUN pip install --no-cache-dir .
USER nobody
CMD ["genline", "--help"]
