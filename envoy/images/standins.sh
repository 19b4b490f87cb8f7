#!/bin/bash
# Builds, once, local stand-ins for the images envoy/docker-compose.yaml names
# but a machine with no registry access cannot pull, and prints the variables
# that make compose use them (KEY=VALUE, one a line):
#
#   eval "$(envoy/images/standins.sh)"; docker compose -f envoy/docker-compose.yaml ...
#
# - a Debian 12 base: `mmdebstrap --variant=minbase bookworm` + `docker import`
#   (stands in for debian:bookworm-slim and distroless/cc-debian12);
# - Envoy: the same binary as .venv/envoy (make envoy), see envoy.Dockerfile;
# - Redis: Debian's redis-server, see redis.Dockerfile;
# - the upstream's build stage: the host-built target/release/upstream
#   (make build), because the Rust image cannot be pulled either.
# Images that exist are kept (tags carry the versions); the upstream one is
# rebuilt each time (a few seconds) so it holds the current binary.
# Run from the repository root, as a user who can talk to the Docker engine.
set -euo pipefail

here=envoy/images
envoy_version=$(cat envoy/VERSION)
debian=apikey-ratelimit-local/debian:12
envoy=apikey-ratelimit-local/envoy:v$envoy_version
redis=apikey-ratelimit-local/redis:7.0
upstream_build=apikey-ratelimit-local/upstream-build:dev
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "standins: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

if ! have "$debian"; then
    command -v mmdebstrap >/dev/null \
        || { say "mmdebstrap is missing: apt-get install -y mmdebstrap (make deploy-tools does)"; exit 1; }
    say "building $debian with mmdebstrap from $mirror"
    mmdebstrap --quiet --variant=minbase bookworm "$ctx/rootfs.tar" "$mirror" >&2
    docker import "$ctx/rootfs.tar" "$debian" >&2
    rm -f "$ctx/rootfs.tar"
fi

if ! have "$envoy"; then
    [ -x .venv/envoy ] || { say ".venv/envoy is missing: run make envoy"; exit 1; }
    say "building $envoy from .venv/envoy"
    cp "$(readlink -f .venv/envoy)" "$ctx/envoy"
    cp "$here/envoy-entrypoint.sh" "$ctx/"
    docker build -q --build-arg BASE_IMAGE="$debian" -f "$here/envoy.Dockerfile" -t "$envoy" "$ctx" >&2
    rm -f "$ctx"/*
fi

if ! have "$redis"; then
    say "building $redis from Debian's redis-server"
    docker build -q --build-arg BASE_IMAGE="$debian" -f "$here/redis.Dockerfile" -t "$redis" "$ctx" >&2
fi

[ -x target/release/upstream ] || { say "target/release/upstream is missing: run make build"; exit 1; }
cp target/release/upstream "$ctx/upstream"
docker build -q --build-arg BASE_IMAGE="$debian" -f "$here/upstream-prebuilt.Dockerfile" -t "$upstream_build" "$ctx" >&2
docker image prune -f --filter label=apikey-ratelimit.standin=upstream-build >/dev/null

echo "ENVOY_IMAGE=$envoy"
echo "REDIS_IMAGE=$redis"
echo "DEBIAN_IMAGE=$debian"
echo "UPSTREAM_BUILD_IMAGE=$upstream_build"
echo "UPSTREAM_RUNTIME_IMAGE=$debian"
