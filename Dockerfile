# sealgate as a sidecar. Build: docker build -t sealgate .   (data and CA on volumes; no key or data baked in)
# The proxy listens on 0.0.0.0:8080; the dashboard (8081), the API (8082) and the probes (9090) stay on
# 127.0.0.1 inside the pod, reached with a port-forward (the probes by the kubelet's exec HEALTHCHECK below).

FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY deploy/requirements.lock ./
RUN python -m venv /opt/sealgate \
 && /opt/sealgate/bin/pip install --no-cache-dir --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY addons ./addons
RUN /opt/sealgate/bin/pip install --no-cache-dir --no-deps .

FROM python:3.12.8-slim-bookworm
COPY --from=build /opt/sealgate /opt/sealgate
COPY config /etc/sealgate
RUN useradd --no-create-home --shell /usr/sbin/nologin --uid 10001 --user-group sealgate \
 && mkdir -p /data /certs \
 && chown 10001:10001 /data /certs \
 && chmod 0700 /data
USER 10001:10001
WORKDIR /data
ENV PATH=/opt/sealgate/bin:$PATH \
    SEALGATE_LISTEN_HOST=0.0.0.0 \
    SEALGATE_LISTEN_PORT=8080 \
    SEALGATE_DATA_DIR=/data \
    SEALGATE_CERTS_DIR=/certs \
    SEALGATE_CONFIG=/etc/sealgate/sealgate.yaml \
    SEALGATE_METRICS_PORT=127.0.0.1:9090 \
    SEALGATE_API_PORT=127.0.0.1:8082 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data", "/certs"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
ENTRYPOINT ["sealgate", "run"]
CMD ["--no-web"]
