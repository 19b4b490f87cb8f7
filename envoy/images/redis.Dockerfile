# Stand-in for the redis image envoy/docker-compose.yaml names, where no
# registry can be reached: Debian 12's redis-server (7.0, the tests' Redis) on
# the local Debian base. Like the official image it has a `redis` user and
# redis-server and redis-cli on PATH; compose supplies the entrypoint
# (envoy/redis-start.sh). Built by envoy/images/standins.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/*
USER redis
