#!/bin/sh
# Starts webdis with the shipped, locked-down envoy/webdis.json, filling in
# only where Redis is and its password: webdis 0.1.9 cannot read either from
# the environment, and the password must not sit in a config file in git.
# The same script runs in the tests, `make run`, docker compose and the
# Kubernetes sidecar, so they all run the same configuration.
#
#   REDIS_PASSWORD  required; letters and digits, at least 16, not the
#                   shipped placeholder (the same rule as redis-start.sh:
#                   each image carries only its own script)
#   REDIS_HOST      default 127.0.0.1
#   REDIS_PORT      default 6379
#   WEBDIS_PORT     default 7379 (webdis always binds 127.0.0.1: a sidecar)
#   WEBDIS_CONFIG   default /etc/webdis/webdis.json
set -eu

fail() { echo "webdis-start: $*" >&2; exit 1; }

config=${WEBDIS_CONFIG:-/etc/webdis/webdis.json}
host=${REDIS_HOST:-127.0.0.1}
redis_port=${REDIS_PORT:-6379}
webdis_port=${WEBDIS_PORT:-7379}
password=${REDIS_PASSWORD:-}

case $password in ''|*[!A-Za-z0-9]*) fail "REDIS_PASSWORD must be set, letters and digits only" ;; esac
[ ${#password} -ge 16 ] || fail "REDIS_PASSWORD must be at least 16 characters (e.g. openssl rand -hex 16)"
case $password in [Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*) fail "REDIS_PASSWORD is the shipped placeholder: set a secret of your own" ;; esac
case $host in ''|*[!A-Za-z0-9.:_-]*) fail "REDIS_HOST is not a host name: $host" ;; esac
case $redis_port$webdis_port in *[!0-9]*) fail "REDIS_PORT and WEBDIS_PORT must be numbers" ;; esac
[ -r "$config" ] || fail "cannot read $config"

rendered=$(mktemp "${TMPDIR:-/tmp}/webdis.XXXXXX")
sed -e "s/\"redis_host\": *\"[^\"]*\"/\"redis_host\": \"$host\"/" \
    -e "s/\"redis_port\": *[0-9]*/\"redis_port\": $redis_port/" \
    -e "s/\"redis_auth\": *null/\"redis_auth\": \"$password\"/" \
    -e "s/\"http_port\": *[0-9]*/\"http_port\": $webdis_port/" \
    "$config" > "$rendered"
for expected in "\"redis_host\": \"$host\"" "\"redis_port\": $redis_port" \
                "\"redis_auth\": \"$password\"" "\"http_port\": $webdis_port" \
                '"http_host": "127.0.0.1"'; do
    grep -q "$expected" "$rendered" || fail "$config does not have the expected shape (no $expected after rendering)"
done
exec webdis "$rendered"
