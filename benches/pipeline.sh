#!/usr/bin/env bash
# The distributed pipeline benchmark (benches/pipeline.rs): starts a tansu broker on its memory
# engine (produce-only throughput), one on its sqlite engine (runs that consume) and a ClickHouse
# server, each in a private directory on free ports, runs the benchmark against them with the
# release binary, and stops them. Arguments pick sections (default all):
# `benches/pipeline.sh ingest,aggregator,queries,growth,freshness` (growth = growth-customers,growth-events). Needs what tests/run.sh installs
# (tansu, clickhouse-server).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${TALLY_TOOLS_DIR:-$HOME/.cache/tally-tools}"
export TANSU_BIN="${TANSU_BIN:-$tools/tansu-0.6.0/bin/tansu}"
[ -x "$TANSU_BIN" ] || { echo "tansu is missing: run tests/run.sh once" >&2; exit 1; }

free_port() { tests/servers.sh free-port; }
dir="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
fast="$(free_port)"; tests/servers.sh kafka-memory "$dir/fast" "$fast" & pids+=($!)
durable="$(free_port)"; tests/servers.sh kafka "$dir/durable" "$durable" & pids+=($!)
ch="$(free_port)"; tests/servers.sh clickhouse "$dir/ch" "$ch" "$(free_port)" "$(free_port)" & pids+=($!)

cargo build --release --locked --bin tally --example pipeline
target="${CARGO_TARGET_DIR:-target}"
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$ch/?query=SELECT%201" >/dev/null 2>&1 && break
    sleep 0.1
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%d)"
BENCH_KAFKA_FAST="127.0.0.1:$fast" BENCH_KAFKA="127.0.0.1:$durable" \
    BENCH_CLICKHOUSE="http://127.0.0.1:$ch" TALLY_BIN="$target/release/tally" \
    "$target/release/examples/pipeline" "$@"
