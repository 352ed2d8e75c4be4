#!/usr/bin/env bash
# Installs what Tally's test suite needs and is missing, and exports where it is:
#
#   tests/install.sh          installs (a no-op once everything is there)
#   . tests/install.sh        the same, and the variables stay set in the calling shell
#                             (tests/run.sh does this)
#
# Debian packages (nginx, curl, clickhouse-server, chromium, node, and the linters of deploy/:
# prometheus for promtool, yamllint, docker-compose), the tansu broker (cargo install),
# playwright-core (npm, for the dashboard test in headless Chromium), kubernetes-validate
# the CloudEvents SDK and chdb (PyPI) and cargo-fuzz, cached in $TALLY_TOOLS_DIR (default
# ~/.cache/tally-tools). Exports TANSU_BIN, TALLY_TEST_NODE_PATH, TALLY_TEST_CHROMIUM,
# TALLY_TEST_KUBERNETES_VALIDATE, TALLY_TEST_PYTHON and cargo-fuzz on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

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
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs npm)
# Linters of deploy/ (tests/deploy.rs): promtool, yamllint, docker-compose.
command -v promtool >/dev/null || missing+=(prometheus)
command -v yamllint >/dev/null || missing+=(yamllint)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    install_debs "${missing[@]}"
fi

tools="${TALLY_TOOLS_DIR:-$HOME/.cache/tally-tools}"
tansu_version=0.6.0
export TANSU_BIN="$tools/tansu-$tansu_version/bin/tansu"
if ! [ -x "$TANSU_BIN" ]; then
    echo "installing tansu $tansu_version (a Kafka-compatible broker; takes 15-25 minutes once)"
    CARGO_TARGET_DIR="$tools/tansu-target" cargo install tansu --version "$tansu_version" --locked \
        --features dynostore,libsql --root "$tools/tansu-$tansu_version" --quiet
fi

# playwright-core drives Chromium in the dashboard test; installed from the lock file, outside
# the repository.
node_dir="$tools/dashboard-node"
if ! cmp -s tests/dashboard/package-lock.json "$node_dir/package-lock.json" \
    || ! [ -d "$node_dir/node_modules/playwright-core" ]; then
    echo "installing playwright-core (dashboard test)"
    mkdir -p "$node_dir"
    cp tests/dashboard/package.json tests/dashboard/package-lock.json "$node_dir/"
    (cd "$node_dir" && npm ci --ignore-scripts --no-audit --no-fund --silent)
fi
export TALLY_TEST_NODE_PATH="$node_dir/node_modules"
export TALLY_TEST_CHROMIUM=/usr/bin/chromium

# kubernetes-validate (Kubernetes' JSON schemas, offline) for the manifests in deploy/.
kube_validate_version=1.37.0
pyenv="$tools/pyenv"
if ! "$pyenv/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$kube_validate_version"; then
    echo "installing kubernetes-validate $kube_validate_version"
    python3 -m venv "$pyenv"
    "$pyenv/bin/pip" install --quiet "kubernetes-validate==$kube_validate_version"
fi
export TALLY_TEST_KUBERNETES_VALIDATE="$pyenv/bin/kubernetes-validate"

# The official CloudEvents Python SDK, which a test sends events with (tests/cloudevents_sdk.rs).
cloudevents_version=1.12.1
if ! "$pyenv/bin/python" -c "import cloudevents, sys; sys.exit(cloudevents.__version__ != '$cloudevents_version')" 2>/dev/null; then
    echo "installing cloudevents $cloudevents_version (Python)"
    "$pyenv/bin/pip" install --quiet "cloudevents==$cloudevents_version"
fi
# chdb: a current ClickHouse engine in process, which the schema test also runs the schema on
# (tests/clickhouse_schema.rs).
chdb_version=4.4.0
if ! "$pyenv/bin/python" -c "import chdb, sys; sys.exit(chdb.__version__ != '$chdb_version')" 2>/dev/null; then
    echo "installing chdb $chdb_version (Python; a current ClickHouse engine)"
    "$pyenv/bin/pip" install --quiet "chdb==$chdb_version"
fi
export TALLY_TEST_PYTHON="$pyenv/bin/python"

# cargo-fuzz for the fuzz smoke runs (fuzz/run.sh smoke).
cargo_fuzz_version=0.13.2
if ! "$tools/cargo-fuzz/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    echo "installing cargo-fuzz $cargo_fuzz_version"
    CARGO_TARGET_DIR="$tools/cargo-fuzz-target" cargo install cargo-fuzz --version "$cargo_fuzz_version" \
        --locked --root "$tools/cargo-fuzz" --quiet
    rm -rf "$tools/cargo-fuzz-target"
fi
export PATH="$tools/cargo-fuzz/bin:$PATH"

