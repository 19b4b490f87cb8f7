# A build stage for upstream/Dockerfile that holds the host-built binary at
# /out/upstream, for machines where the Rust image cannot be pulled:
# upstream/Dockerfile then skips `cargo build` and the test runs its runtime
# stage as shipped. Built by envoy/images/standins.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY upstream /out/upstream
# standins.sh prunes the untagged ones an older binary leaves.
LABEL apikey-ratelimit.standin=upstream-build
