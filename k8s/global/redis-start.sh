#!/bin/sh
# Starts Redis with the shipped envoy/redis-acl.conf, filling in its two
# passwords from the environment (so no password sits in a file in git), and
# loads the filter's function library (gcra.lua) before any client can
# connect: Redis starts with no TCP port, only a private unix socket; the
# admin user loads the library there, then opens the TCP port (CONFIG SET
# port). So after every (re)start the function is there for the very first
# FCALL; until then webdis gets "connection refused", a failure the filter
# bounds by its timeout. No persistence: rate-limit state is short-lived and
# Redis forgets idle keys anyway. The same script runs in the tests,
# `make run`, docker compose and Kubernetes.
#
#   REDIS_PASSWORD        required: the user webdis connects as (may only FCALL)
#   REDIS_ADMIN_PASSWORD  required, different: the admin user (loads the
#                         library; probes; operators)
#                         Both: letters and digits, at least 16, not the
#                         shipped placeholder.
#   REDIS_ACL             default /etc/redis/redis-acl.conf
#   REDIS_FUNCTIONS       default /etc/redis/gcra.lua
#   REDIS_PORT            default 6379
#   REDIS_BIND            default 127.0.0.1 (0.0.0.0 in a container behind a Service)
#   extra arguments are passed on to redis-server
set -eu

fail() { echo "redis-start: $*" >&2; exit 1; }

# A password for Redis: letters and digits, 16 or more, not a placeholder.
check_password() {
    case $2 in ''|*[!A-Za-z0-9]*) fail "$1 must be set, letters and digits only" ;; esac
    [ ${#2} -ge 16 ] || fail "$1 must be at least 16 characters (e.g. openssl rand -hex 16)"
    case $2 in [Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*) fail "$1 is the shipped placeholder: set a secret of your own" ;; esac
}

acl=${REDIS_ACL:-/etc/redis/redis-acl.conf}
functions=${REDIS_FUNCTIONS:-/etc/redis/gcra.lua}
port=${REDIS_PORT:-6379}
bind=${REDIS_BIND:-127.0.0.1}
password=${REDIS_PASSWORD:-}
admin=${REDIS_ADMIN_PASSWORD:-}

check_password REDIS_PASSWORD "$password"
check_password REDIS_ADMIN_PASSWORD "$admin"
[ "$admin" != "$password" ] || fail "REDIS_ADMIN_PASSWORD must differ from REDIS_PASSWORD"
case $port in ''|*[!0-9]*) fail "REDIS_PORT must be a number" ;; esac
[ -r "$acl" ] || fail "cannot read $acl"
[ -r "$functions" ] || fail "cannot read $functions"

dir=$(mktemp -d "${TMPDIR:-/tmp}/redis.XXXXXX")
conf=$dir/redis.conf
socket=$dir/admin.sock
sed -e "/^user default /s/ >[^ ]*/ >$password/" \
    -e "/^user admin /s/ >[^ ]*/ >$admin/" "$acl" > "$conf"
grep -q "^user default on >$password " "$conf" || fail "$acl has no 'user default on >...' line"
grep -q "^user admin on >$admin " "$conf" || fail "$acl has no 'user admin on >...' line"

# In the background: once the socket answers, load the library and open the
# port. After `exec`, $$ is redis-server itself: on failure, kill it (it
# holds nothing yet), so it exits unsuccessfully and is restarted.
(
    export REDISCLI_AUTH="$admin"
    cli() { redis-cli -s "$socket" --user admin "$@"; }
    tries=0
    until [ "$(cli ping 2>/dev/null)" = PONG ]; do
        kill -0 $$ 2>/dev/null || exit 1
        tries=$((tries + 1))
        [ $tries -le 300 ] || { echo "redis-start: Redis never answered on $socket" >&2; kill -KILL $$; exit 1; }
        sleep 0.1
    done
    if ! out=$(cli -x FUNCTION LOAD REPLACE < "$functions" 2>&1) || [ "$out" != apikey_ratelimit ]; then
        echo "redis-start: cannot load $functions: $out" >&2; kill -KILL $$; exit 1
    fi
    out=$(cli CONFIG SET port "$port" 2>&1)
    [ "$out" = OK ] || { echo "redis-start: cannot open port $port: $out" >&2; kill -KILL $$; exit 1; }
) &

exec redis-server "$conf" --port 0 --unixsocket "$socket" --unixsocketperm 700 \
    --bind "$bind" --save "" --appendonly no "$@"
