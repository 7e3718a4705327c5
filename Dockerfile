# syntax=docker/dockerfile:1
# angelstream: the worker (default), the candle builder and the simulator, from one image.
#   docker build -t angelstream .      docker run --env-file .env angelstream            (angelstream run)

FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY worker ./worker
COPY consumers ./consumers
COPY bench ./bench
# Exactly the pinned versions, then the project itself without touching them; no pip cache kept.
RUN python -m venv /opt/angelstream \
 && /opt/angelstream/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/angelstream/bin/pip install --no-cache-dir -r requirements.lock \
 && /opt/angelstream/bin/pip install --no-cache-dir --no-deps . \
 && rm -rf /root/.cache

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin angelstream
COPY --from=build /opt/angelstream /opt/angelstream
ENV PATH=/opt/angelstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEALTH_HOST=0.0.0.0 \
    HEALTH_PORT=8000 \
    INSTRUMENTS_CACHE=/home/angelstream/.angelstream/instruments.json
USER angelstream
WORKDIR /home/angelstream
EXPOSE 8000
# SIGTERM: stop reading, close the sockets, flush buffered ticks, exit 0 (within SHUTDOWN_TIMEOUT + 0.5 s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["angelstream"]
CMD ["run"]
