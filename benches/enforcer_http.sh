#!/usr/bin/env bash
# HTTP quota checks per second and latency at fixed offered loads, Tally beside an axum handler
# that does nothing (benches/baseline_axum.rs) and beside a Redis-backed quota check (INCRBY in a
# Lua script per request, benches/baseline_redis.rs, with Debian's redis-server), interleaved,
# on this machine.
#
# Usage: benches/enforcer_http.sh [seconds per run] [runs]
# Needs oha (cargo install oha --locked); set OHA=/path/to/oha if it is not on PATH.
# Prints a markdown table: per target and offered load, the median over the runs of the achieved
# rate and the p50 / p99 / p99.9 latency (oha with --latency-correction, 64 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
RUNS="${2:-3}"
OHA="${OHA:-oha}"
command -v "$OHA" >/dev/null || { echo "oha not found: cargo install oha --locked" >&2; exit 1; }

command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }
cargo build --release --quiet --bin tally --example baseline_axum --example baseline_redis
TARGET="${CARGO_TARGET_DIR:-target}/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TALLY_PORT=$(free_port); ADMIN_PORT=$(free_port); BASE_PORT=$(free_port); REDIS_PORT=$(free_port); RBASE_PORT=$(free_port)

# The bench catalogue lifts the plans' request-rate limits so that every check runs the whole
# decision, token bucket included, without being refused.
sed -E 's/rate_limit = \{ per_second = [0-9_]+, burst = [0-9_]+ \}/rate_limit = { per_second = 100000000, burst = 100000000 }/' \
    schemas/catalog.toml > "$WORK/catalog.toml"
TALLY_DATA_DIR="$WORK/data" TALLY_LISTEN="127.0.0.1:$TALLY_PORT" TALLY_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
    TALLY_CATALOG_FILE="$WORK/catalog.toml" TALLY_LOG=warn "$TARGET/tally" run &
PIDS+=($!)
"$TARGET/examples/baseline_axum" "127.0.0.1:$BASE_PORT" &
PIDS+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$TARGET/examples/baseline_redis" "127.0.0.1:$RBASE_PORT" "redis://127.0.0.1:$REDIS_PORT" &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done

# Usage for 1,000 customers, so checks find counters.
python3 - "$TALLY_PORT" <<'PY'
import json, sys, urllib.request
events = [{"specversion": "1.0", "id": f"b-{i}", "source": "bench", "type": "api_requests",
           "subject": f"bench-{i:03d}", "data": {"value": 1 + i}} for i in range(1000)]
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/events", json.dumps(events).encode(),
                             {"content-type": "application/cloudevents-batch+json"})
assert urllib.request.urlopen(req).status == 202
PY
sleep 1

run() { # target port rate -> "rps p50 p99 p999" (latencies in microseconds)
    local port=$1 rate=$2 q=()
    [ "$rate" = max ] || q=(-q "$rate" --latency-correction)
    "$OHA" --no-tui --output-format json -z "${SECS}s" -c 64 "${q[@]}" --rand-regex-url \
        "http://127.0.0.1:$port/v1/check\?customer=bench-[0-9]{3}&meter=api_requests&quantity=1" |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
ok = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if k.startswith("2"))
print(d["summary"]["requestsPerSec"], p["p50"] * 1e6, p["p99"] * 1e6, p["p99.9"] * 1e6, ok)'
}

declare -A RESULTS
for rate in 10000 50000 max; do
    for r in $(seq "$RUNS"); do
        for target in baseline tally redis; do
            case $target in baseline) port=$BASE_PORT ;; tally) port=$TALLY_PORT ;; redis) port=$RBASE_PORT ;; esac
            RESULTS[$target,$rate]+="$(run "$port" "$rate")"$'\n'
        done
    done
done

echo "| target | offered load | achieved checks/s | p50 | p99 | p99.9 |"
echo "|---|---|---|---|---|---|"
for rate in 10000 50000 max; do
    for target in baseline tally redis; do
        printf '%s' "${RESULTS[$target,$rate]}" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows)
target, rate = sys.argv[1], sys.argv[2]
print(f"| {target} | {rate}/s | {med(0):,.0f} | {med(1):.0f} us | {med(2):.0f} us | {med(3):.0f} us |")' "$target" "$rate"
    done
done
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); oha and the servers share these cores; ${RUNS} runs of ${SECS}s each, interleaved"
