#!/usr/bin/env bash
# HTTP quota checks per second and latency at fixed offered loads, Tally beside an axum handler
# that does nothing (benches/baseline_axum.rs) and beside a Redis-backed quota check (INCRBY in a
# Lua script per request, benches/baseline_redis.rs, with Debian's redis-server), interleaved,
# on this machine.
#
# Usage: benches/enforcer_http.sh [seconds per run] [runs]
# Needs oha (cargo install oha --locked); set OHA=/path/to/oha if it is not on PATH.
# Prints a markdown table: per target and offered load, the median over the runs of the achieved
# rate, the p50 / p99 / p99.9 latency (oha with --latency-correction, 64 connections) and the
# servers' CPU time per answered check (user + system from /proc; for the Redis check, its axum
# process and redis-server together), which does not depend on how much CPU oha took.
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
TALLY_PID=$!
PIDS+=($!)
"$TARGET/examples/baseline_axum" "127.0.0.1:$BASE_PORT" &
BASE_PID=$!
PIDS+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
REDIS_PID=$!
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$TARGET/examples/baseline_redis" "127.0.0.1:$RBASE_PORT" "redis://127.0.0.1:$REDIS_PORT" &
RBASE_PID=$!
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

cpu_ticks() { # pids -> user + system clock ticks, summed
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}

run() { # port rate pids... -> "rps p50 p99 p999 ok cpu_us_per_check" (latencies in microseconds)
    local port=$1 rate=$2 q=() before
    shift 2
    [ "$rate" = max ] || q=(-q "$rate" --latency-correction)
    before=$(cpu_ticks "$@")
    "$OHA" --no-tui --output-format json -z "${SECS}s" -c 64 "${q[@]}" --rand-regex-url \
        "http://127.0.0.1:$port/v1/check\?customer=bench-[0-9]{3}&meter=api_requests&quantity=1" > "$WORK/oha.json"
    python3 - "$WORK/oha.json" "$(( $(cpu_ticks "$@") - before ))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
cpu_us = int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / max(1, sum(codes.values()))
print(d["summary"]["requestsPerSec"], p["p50"] * 1e6, p["p99"] * 1e6, p["p99.9"] * 1e6, ok, cpu_us)
PY
}

declare -A RESULTS
for rate in 10000 50000 max; do
    for r in $(seq "$RUNS"); do
        for target in baseline tally redis; do
            case $target in
                baseline) args=("$BASE_PORT" "$rate" "$BASE_PID") ;;
                tally) args=("$TALLY_PORT" "$rate" "$TALLY_PID") ;;
                redis) args=("$RBASE_PORT" "$rate" "$RBASE_PID" "$REDIS_PID") ;;
            esac
            RESULTS[$target,$rate]+="$(run "${args[@]}")"$'\n'
        done
    done
done

echo "| target | offered load | achieved checks/s | p50 | p99 | p99.9 | server CPU per check |"
echo "|---|---|---|---|---|---|---|"
for rate in 10000 50000 max; do
    for target in baseline tally redis; do
        printf '%s' "${RESULTS[$target,$rate]}" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows)
target, rate = sys.argv[1], sys.argv[2]
print(f"| {target} | {rate}/s | {med(0):,.0f} | {med(1):.0f} us | {med(2):.0f} us | {med(3):.0f} us | {med(5):.1f} us |")' "$target" "$rate"
    done
done
echo
# Ratios per run (each run interleaves the three targets), then their median.
printf '%s\n---\n%s\n---\n%s' "${RESULTS[baseline,max]}" "${RESULTS[tally,max]}" "${RESULTS[redis,max]}" | python3 -c '
import statistics, sys
b, t, r = ([list(map(float, l.split())) for l in part.splitlines() if l.strip()]
           for part in sys.stdin.read().split("---"))
med = lambda xs: statistics.median(xs)
print(f"- flat out, checks/s: Tally / empty handler {med([x[0] / y[0] for x, y in zip(t, b)]):.2f}x, "
      f"Tally / Redis check {med([x[0] / y[0] for x, y in zip(t, r)]):.2f}x (medians of per-run ratios)")
print(f"- flat out, server CPU per check: empty handler / Tally {med([y[5] / x[5] for x, y in zip(t, b)]):.2f}x, "
      f"Redis check / Tally {med([y[5] / x[5] for x, y in zip(t, r)]):.2f}x (higher is better for Tally)")'
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); oha and the servers share these cores; ${RUNS} runs of ${SECS}s each, interleaved"
