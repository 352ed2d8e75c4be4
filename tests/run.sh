#!/usr/bin/env bash
# Runs Tally's whole test suite: formatting, lints, and every test of every crate (unit tests,
# the end-to-end tests in tests/, the README walk-through and the kill -9 test against the real
# binary, nginx in front of the enforcer, the ClickHouse schema on a private ClickHouse server). Installs the Debian packages the tests use when they
# are missing; the tests start and stop the servers themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

install_debs() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
missing=()
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/bin/clickhouse-server ] || [ -x /usr/sbin/clickhouse-server ] || missing+=(clickhouse-server clickhouse-client)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    install_debs "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
