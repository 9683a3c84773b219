# Orders service image. One image, three roles (see docker-compose.yml):
#   orders api (default) | orders migrate | orders projector
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so a source edit does not reinstall them; at the exact
# versions CI passed with (constraints.txt).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Editable install on purpose: the code finds alembic.ini and migrations/ relative to
# the source tree (service/infra/database.py), so the tree must stay at /app.
COPY . .
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e /app \
    && python -m compileall -q /app/service /app/projections /app/migrations

# Source stays root-owned and read-only for the runtime user.
RUN groupadd --system --gid 10001 orders \
    && useradd --system --uid 10001 --gid orders --create-home --home-dir /home/orders \
        --shell /usr/sbin/nologin orders \
    && install -d -o orders -g orders /identity
# /identity: where compose's development token issuer keeps its key (a volume the new
# directory's owner carries over to).
USER orders

EXPOSE 8000

# Liveness of the API on its default port; compose disables it for migrate/projector.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

CMD ["orders", "api", "--host", "0.0.0.0", "--port", "8000"]
