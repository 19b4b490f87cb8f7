# The locked-down webdis sidecar: Debian's webdis (the exact version the
# end-to-end tests run), the shipped envoy/webdis.json and the shipped
# envoy/webdis-start.sh, which fills in REDIS_HOST, REDIS_PORT and
# REDIS_PASSWORD from the environment and execs webdis (always on 127.0.0.1:
# run it in the Envoy container's network namespace, or the same pod).
# The build context is the repository root:
#
#   docker build -f envoy/webdis.Dockerfile -t apikey-ratelimit/webdis:0.1.9 .
#
# Environment: REDIS_PASSWORD (required: letters and digits, 16 or more,
# not the shipped placeholder), REDIS_HOST
# (default 127.0.0.1), REDIS_PORT (6379), WEBDIS_PORT (7379).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG WEBDIS_VERSION=0.1.9+dfsg-1.1

RUN apt-get update \
 && apt-get install -y --no-install-recommends "webdis=${WEBDIS_VERSION}" \
 && rm -rf /var/lib/apt/lists/*

COPY envoy/webdis.json /etc/webdis/webdis.json
COPY envoy/webdis-start.sh /usr/local/bin/webdis-start
RUN chmod 0644 /etc/webdis/webdis.json && chmod 0755 /usr/local/bin/webdis-start

# Non-root, by number so that Kubernetes' runAsNonRoot can verify it; the
# same uid as the upstream image and k8s/ (distroless's "nonroot"). webdis
# needs no home or passwd entry, only a writable /tmp for webdis-start.sh.
USER 65532:65532
EXPOSE 7379
# Healthy when webdis answers, reaches Redis as the filter's user and the
# function answers: with no limits it only reads Redis's clock (bash's
# /dev/tcp; the image has no curl).
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${WEBDIS_PORT:-7379} && printf 'GET /FCALL/apikey_ratelimit_gcra/1/apikey_ratelimit%%3Ahealth/0 HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '\"FCALL\":\\[1,0,' <&3"]
ENTRYPOINT ["/usr/local/bin/webdis-start"]
