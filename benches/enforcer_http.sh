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
cargo build --release --quiet --bin tally --example baseline_axum --example baseline_redis \
    --example baseline_grpc --example grpc_load
TARGET="${CARGO_TARGET_DIR:-target}/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TALLY_PORT=$(free_port); ADMIN_PORT=$(free_port); BASE_PORT=$(free_port); REDIS_PORT=$(free_port); RBASE_PORT=$(free_port)
GBASE_PORT=$(free_port)

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
"$TARGET/examples/baseline_grpc" "127.0.0.1:$GBASE_PORT" &
GBASE_PID=$!
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

run() { # http|grpc port rate pids... -> "rps p50 p99 p999 ok cpu_us_per_check" (latencies in us)
    local proto=$1 port=$2 rate=$3 q=() before
    shift 3
    before=$(cpu_ticks "$@")
    if [ "$proto" = grpc ]; then
        # 4 HTTP/2 connections of 16 streams: 64 calls in flight, like oha's 64 connections.
        "$TARGET/examples/grpc_load" "http://127.0.0.1:$port" "$rate" "$SECS" 4 > "$WORK/load.json"
    else
        [ "$rate" = max ] || q=(-q "$rate" --latency-correction)
        "$OHA" --no-tui --output-format json -z "${SECS}s" -c 64 "${q[@]}" --rand-regex-url \
            "http://127.0.0.1:$port/v1/check\?customer=bench-[0-9]{3}&meter=api_requests&quantity=1" > "$WORK/load.json"
    fi
    python3 - "$proto" "$WORK/load.json" "$(( $(cpu_ticks "$@") - before ))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
proto, path, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = json.load(open(path))
if proto == "grpc":
    rps, p50, p99, p999, ok, n = d["rps"], d["p50_us"], d["p99_us"], d["p999_us"], d["ok"], d["ok"] + d["errors"]
else:
    p = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    n = sum(codes.values())
    rps, p50, p99, p999 = d["summary"]["requestsPerSec"], p["p50"] * 1e6, p["p99"] * 1e6, p["p99.9"] * 1e6
print(rps, p50, p99, p999, ok, ticks / hz * 1e6 / max(1, n))
PY
}

TARGETS="baseline tally redis grpc-baseline tally-grpc"
declare -A RESULTS
for rate in 10000 50000 max; do
    for r in $(seq "$RUNS"); do
        for target in $TARGETS; do
            case $target in
                baseline) args=(http "$BASE_PORT" "$rate" "$BASE_PID") ;;
                tally) args=(http "$TALLY_PORT" "$rate" "$TALLY_PID") ;;
                redis) args=(http "$RBASE_PORT" "$rate" "$RBASE_PID" "$REDIS_PID") ;;
                grpc-baseline) args=(grpc "$GBASE_PORT" "$rate" "$GBASE_PID") ;;
                tally-grpc) args=(grpc "$TALLY_PORT" "$rate" "$TALLY_PID") ;;
            esac
            RESULTS[$target,$rate]+="$(run "${args[@]}")"$'\n'
        done
    done
done

for rate in 10000 50000 max; do
    for target in $TARGETS; do
        printf '%s' "${RESULTS[$target,$rate]}" | sed "s/^/$target $rate /"
    done
done > "$WORK/results.txt"

# The table (medians over the runs) and the ratios (per run, each run interleaving the targets,
# then their median). With BENCH_RESULTS set, the figures are also appended to that file as
# `key<TAB>value` lines for benches/run.sh.
python3 - "$WORK/results.txt" "${BENCH_RESULTS:-}" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    target, rate, *v = line.split()
    rows[target, rate].append(list(map(float, v)))
med = statistics.median
out = open(sys.argv[2], "a") if sys.argv[2] else None
def result(key, value):
    if out:
        out.write(f"{key}\t{value}\n")
print("| target | offered load | achieved checks/s | p50 | p99 | p99.9 | server CPU per check |")
print("|---|---|---|---|---|---|---|")
for rate in ["10000", "50000", "max"]:
    for target in ["baseline", "tally", "redis", "grpc-baseline", "tally-grpc"]:
        r = rows[target, rate]
        m = [med(x[i] for x in r) for i in range(6)]
        print(f"| {target} | {rate}/s | {m[0]:,.0f} | {m[1]:.0f} us | {m[2]:.0f} us | {m[3]:.0f} us | {m[5]:.1f} us |")
        for i, name in [(0, "rps"), (1, "p50_us"), (2, "p99_us"), (3, "p999_us"), (5, "cpu_us")]:
            result(f"check.{target}.{rate}.{name}", f"{m[i]:.1f}")
def ratio(a, b, i, invert=False):
    xs = [(y[i] / x[i]) if invert else (x[i] / y[i]) for x, y in zip(rows[a, "max"], rows[b, "max"])]
    return med(xs)
print()
pairs = [("tally", "baseline", "Tally / empty axum handler"), ("tally", "redis", "Tally / Redis check"),
         ("tally-grpc", "grpc-baseline", "Tally gRPC / empty gRPC handler")]
for a, b, name in pairs:
    t, c = ratio(a, b, 0), ratio(a, b, 5, invert=True)
    print(f"- flat out, {name}: {t:.2f}x checks/s, {c:.2f}x CPU per check (theirs / ours; higher is better for Tally)")
    result(f"check.ratio.{a}.{b}.rps", f"{t:.2f}")
    result(f"check.ratio.{a}.{b}.cpu", f"{c:.2f}")
PY
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); the load generators and the servers share these cores; ${RUNS} runs of ${SECS}s each, interleaved"
