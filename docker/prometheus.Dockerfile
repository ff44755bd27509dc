# Prometheus from Debian's package, for machines that cannot pull prom/prometheus (no registry):
# scripts/local_images.sh builds it as distill-prometheus:debian, with the .deb it downloads with
# apt in the build context. Same entrypoint, paths and user as the official image, so
# docker-compose.yml's prometheus service runs it unchanged (docker/compose.offline.yml).
ARG BASE_IMAGE=distill-base:bookworm
FROM ${BASE_IMAGE}
COPY prometheus_*.deb /tmp/
# The server binary only: the Debian package's other dependencies serve its web console.
RUN dpkg-deb --fsys-tarfile /tmp/prometheus_*.deb | tar -x -C / ./usr/bin/prometheus \
    && rm /tmp/prometheus_*.deb \
    && mkdir -p /prometheus /etc/prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
VOLUME /prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]
