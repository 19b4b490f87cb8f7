#!/bin/sh
# The official Envoy image's rule: `docker run IMAGE -c x.yaml` means `envoy -c x.yaml`.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- envoy "$@"
fi
exec "$@"
