# lakesaga service image.  Build:  docker build -t lakesaga .
# Run:    docker run -p 8000:8000 -e LAKESAGA_... lakesaga        (default: `lakesaga serve`)

# ---- builder: resolve and install everything into /opt/venv --------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# Dependencies first, read from pyproject.toml, so that this layer stays cached while only
# app/ changes (setuptools cannot build the package itself without app/ present).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

COPY app/ ./app/
RUN pip install --no-cache-dir --no-deps . \
    && pip check

# ---- runtime: slim image, non-root ----------------------------------------------------------
FROM python:3.11-slim AS runtime

RUN groupadd --system --gid 10001 lakesaga \
    && useradd --system --uid 10001 --gid lakesaga --home-dir /srv/lakesaga --no-create-home \
        --shell /usr/sbin/nologin lakesaga

COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/lakesaga
COPY alembic.ini ./
COPY migrations/ ./migrations/
RUN mkdir -p /srv/lakesaga/var/raw /srv/lakesaga/var/lake \
    && chown -R lakesaga:lakesaga /srv/lakesaga/var

# Numeric so that runtimes checking runAsNonRoot can verify it (hadolint DL3066).
USER 10001:10001
ENV PATH=/opt/venv/bin:$PATH \
    LAKESAGA_SOURCE_ROOT=/srv/lakesaga/var/raw \
    LAKESAGA_LAKE_DIR=/srv/lakesaga/var/lake \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["lakesaga"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
