#!/bin/sh
# Starts Redis with the shipped envoy/redis-acl.conf (the only user webdis
# may connect as), filling in its password from the environment, so the
# password never sits in a file in git. No persistence: rate-limit state is
# short-lived and Redis forgets idle keys anyway. The same script runs in the
# tests, `make run`, docker compose and Kubernetes.
#
#   REDIS_PASSWORD  required; letters and digits only
#   REDIS_ACL       default /etc/redis/redis-acl.conf
#   REDIS_PORT      default 6379
#   REDIS_BIND      default 127.0.0.1 (0.0.0.0 in a container behind a Service)
#   extra arguments are passed on to redis-server
set -eu

fail() { echo "redis-start: $*" >&2; exit 1; }

acl=${REDIS_ACL:-/etc/redis/redis-acl.conf}
port=${REDIS_PORT:-6379}
bind=${REDIS_BIND:-127.0.0.1}
password=${REDIS_PASSWORD:-}

case $password in ''|*[!A-Za-z0-9]*) fail "REDIS_PASSWORD must be set, letters and digits only" ;; esac
case $port in ''|*[!0-9]*) fail "REDIS_PORT must be a number" ;; esac
[ -r "$acl" ] || fail "cannot read $acl"

conf=$(mktemp "${TMPDIR:-/tmp}/redis.XXXXXX")
sed -e "s/ >[^ ]*/ >$password/" "$acl" > "$conf"
grep -q "^user default on >$password " "$conf" || fail "$acl has no 'user default on >...' line"
exec redis-server "$conf" --port "$port" --bind "$bind" --save "" --appendonly no "$@"
