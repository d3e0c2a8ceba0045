# sealgate as a sidecar: the proxy on :8080. Mount data/ (store + master key) and certs/
# (the CA workers trust) as volumes so they survive restarts.
FROM python:3.12-slim

RUN useradd --create-home --uid 10001 sealgate
WORKDIR /app
COPY pyproject.toml README.md ./
COPY addons ./addons
COPY config ./config
RUN pip install --no-cache-dir . && mkdir -p data certs && chown sealgate data certs

USER sealgate
ENV SEALGATE_LISTEN_HOST=0.0.0.0 \
    SEALGATE_DATA_DIR=/app/data \
    SEALGATE_CERTS_DIR=/app/certs \
    SEALGATE_CONFIG=/app/config/sealgate.yaml
VOLUME ["/app/data", "/app/certs"]
EXPOSE 8080
# the dashboard (8081) and the probes (9090) listen on 127.0.0.1 inside the pod: reach them with a port-forward
ENTRYPOINT ["sealgate"]
CMD ["run"]
