#!/usr/bin/env bash
# Every benchmark in one command, printed as one markdown table (about 30 minutes on 2 cores).
#
#   benches/run.sh              # everything
#   benches/run.sh --quick      # shorter HTTP runs (1 run of 2 s per load); pipeline sections
#                               # without growth
#
# Runs, in this order, each with its same-run baselines (see benches/README.md for each part):
#   1. cargo bench --bench hot_paths         parse, encode, roll-up, decide (criterion)
#   2. cargo bench --bench enforcer_memory   bytes per (customer, meter) counter at 10M counters
#   3. benches/enforcer_http.sh              HTTP and gRPC checks beside an empty handler and a
#                                            Redis INCRBY+Lua check, at 10k/s, 50k/s and flat out
#   4. benches/pipeline.sh                   ingest beside a raw librdkafka producer, embedded
#                                            ingest, aggregator, queries, growth, freshness
# Each writes its figures as `key<TAB>value` lines to one results file; the table below is built
# from that file, so every figure in it comes from this run. The raw outputs are kept in
# $BENCH_OUT (default: a new directory under /tmp), printed at the end.
# Needs what tests/run.sh installs (tansu, clickhouse-server), plus oha and redis-server
# (see enforcer_http.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = --quick ] && QUICK=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OUT="${BENCH_OUT:-$(mktemp -d /tmp/tally-bench.XXXXXX)}"
mkdir -p "$OUT"
export BENCH_RESULTS="$OUT/results.tsv"
: > "$BENCH_RESULTS"
started=$(date +%s)
# CPU time the hypervisor gave to others while this VM wanted it: a noisy-neighbour gauge.
steal() { awk '/^cpu / {print $9}' /proc/stat; }
total() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t}' /proc/stat; }
steal0=$(steal); total0=$(total)

echo "== hot paths (criterion)" >&2
cargo bench --locked --bench hot_paths > "$OUT/hot_paths.txt" 2>&1
python3 - "$CARGO_TARGET_DIR/criterion" >> "$BENCH_RESULTS" <<'PY'
import json, os, sys
root = sys.argv[1]
# (criterion id, elements per iteration)
for bench, per in [("parse_validate_encode/baseline_serde_json_value", 1),
                   ("parse_validate_encode/single_event", 1),
                   ("parse_validate_encode/batch_of_1000", 1000),
                   ("rollup/10k_events_1k_customers", 10000),
                   ("decide/check_hot_1k_customers", 1),
                   ("decide/check_hot_1k_customers_rate_limited", 1),
                   ("decide/check_100k_customers", 1),
                   ("decide/apply_1000_events", 1000)]:
    with open(os.path.join(root, bench, "new", "estimates.json")) as f:
        ns = json.load(f)["median"]["point_estimate"] / per
    print(f"hot.{bench.split('/')[1]}.ns\t{ns:.1f}")
PY

echo "== enforcer memory" >&2
cargo bench --locked --bench enforcer_memory > "$OUT/enforcer_memory.txt" 2>&1

echo "== HTTP and gRPC checks" >&2
if [ "$QUICK" = 1 ]; then http_args=(2 1); else http_args=(5 3); fi
benches/enforcer_http.sh "${http_args[@]}" > "$OUT/enforcer_http.txt" 2>&1

echo "== distributed pipeline" >&2
if [ "$QUICK" = 1 ]; then
    benches/pipeline.sh ingest,aggregator,queries,freshness > "$OUT/pipeline.txt" 2>&1
else
    benches/pipeline.sh > "$OUT/pipeline.txt" 2>&1
fi

python3 - "$BENCH_RESULTS" "$(nproc)" "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" \
    "$(( ($(date +%s) - started) / 60 ))" \
    "$(python3 -c "print(f'{100 * ($(steal) - $steal0) / max(1, $(total) - $total0):.1f}')")" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split("\t")
    r[k] = float(v)
cores, mem, minutes, steal = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def g(k):
    return r.get(k)
def fmt(v, unit="", digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"
def ratio(a, b, digits=2):
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.{digits}f}x"
def met(ok):
    return "n/a" if ok is None else ("yes" if ok else "**no**")
rows = []
def row(area, measure, tally, baseline, rat, goal, ok):
    rows.append(f"| {area} | {measure} | {tally} | {baseline} | {rat} | {goal} | {met(ok) if goal else ''} |")

# Hot paths.
base = g("hot.baseline_serde_json_value.ns")
for key, name in [("single_event", "parse + validate + encode, one event"),
                  ("batch_of_1000", "the same, per event of a 1,000-event batch")]:
    ns = g(f"hot.{key}.ns")
    rate = 1e3 / ns if ns else None
    row("ingest (in process)", name, fmt(rate, " M events/s", 2), f"generic JSON parse {fmt(1e3 / base if base else None, ' M/s', 2)}",
        ratio(base, ns), ">= 1 M/s per core", None if rate is None else rate >= 1.0)
ns = g("hot.10k_events_1k_customers.ns")
row("aggregator (in process)", "roll-up into per-minute cells", fmt(1e3 / ns if ns else None, " M events/s", 2), "", "", "", None)
for key, name in [("check_hot_1k_customers", "decision, customer in cache"),
                  ("check_hot_1k_customers_rate_limited", "decision with the plan's token bucket"),
                  ("check_100k_customers", "decision, random one of 100k customers")]:
    ns = g(f"hot.{key}.ns")
    row("enforcer (in process)", name, fmt(ns, " ns", 0), "", "", "< 200 ns", None if ns is None else ns < 200)
ns = g("hot.apply_1000_events.ns")
row("enforcer (in process)", "apply a log record", fmt(ns, " ns", 0), "", "", "", None)
for m in ["7", "3", "1"]:
    b = g(f"memory.bytes_per_counter.{m}")
    row("enforcer memory", f"bytes per counter, 10M counters, {m} meter(s) per customer", fmt(b, " B", 1), "", "", "<= 100 B",
        None if b is None else b <= 100)

# Checks over the network.
for proto, target, basename, base_t in [("HTTP", "tally", "empty axum handler", "baseline"),
                                         ("gRPC", "tally-grpc", "empty gRPC handler", "grpc-baseline")]:
    for rate in ["10000", "50000", "max"]:
        rps, p50, p99, p999 = (g(f"check.{target}.{rate}.{k}") for k in ["rps", "p50_us", "p99_us", "p999_us"])
        brps, bp99 = g(f"check.{base_t}.{rate}.rps"), g(f"check.{base_t}.{rate}.p99_us")
        label = "flat out" if rate == "max" else f"offered {int(rate) // 1000}k/s"
        goal, ok = "", None
        if proto == "HTTP" and rate == "50000":
            goal, ok = "p99 < 1 ms", None if p99 is None else p99 < 1000
        row(f"enforcer {proto}", f"{label}: checks/s; p50 / p99 / p99.9",
            f"{fmt(rps)}; {fmt(p50)} / {fmt(p99)} / {fmt(p999)} us",
            f"{basename}: {fmt(brps)}; p99 {fmt(bp99)} us", ratio(rps, brps), goal, ok)
    cpu, bcpu = g(f"check.{target}.max.cpu_us"), g(f"check.{base_t}.max.cpu_us")
    row(f"enforcer {proto}", "flat out: server CPU per check", fmt(cpu, " us", 1), f"{basename}: {fmt(bcpu, ' us', 1)}",
        ratio(bcpu, cpu), "", None)
t = g("check.ratio.tally.baseline.rps")
row("enforcer HTTP", "flat out, checks/s vs. empty handler (median of per-run ratios)", fmt(t, "x", 2), "", "", ">= 0.8x",
    None if t is None else t >= 0.8)
t, c = g("check.ratio.tally.redis.rps"), g("check.ratio.tally.redis.cpu")
row("enforcer HTTP", "flat out, vs. Redis INCRBY+Lua check: checks/s; CPU per check", f"{fmt(t, 'x', 2)}; {fmt(c, 'x', 2)}",
    f"Redis check: {fmt(g('check.redis.max.rps'))}/s, {fmt(g('check.redis.max.cpu_us'), ' us', 1)}", "", ">= 3x",
    None if t is None else t >= 3)

# Pipeline.
raw, kafka, emb = g("ingest.raw.rps"), g("ingest.kafka.rps"), g("ingest.embedded.rps")
row("ingest", "HTTP batch ingest into the broker, events/s", fmt(kafka), f"raw librdkafka producer: {fmt(raw)}",
    fmt(g("ingest.ratio"), "x", 2), ">= 0.8x", None if g("ingest.ratio") is None else g("ingest.ratio") >= 0.8)
row("ingest", "CPU s per million events", fmt(g("ingest.kafka.cpu_s_per_m"), " s", 2),
    f"raw producer: {fmt(g('ingest.raw.cpu_s_per_m'), ' s', 2)}", ratio(g("ingest.raw.cpu_s_per_m"), g("ingest.kafka.cpu_s_per_m")), "", None)
row("ingest", "embedded default (no broker): events/s; CPU s per million", f"{fmt(emb)}; {fmt(g('ingest.embedded.cpu_s_per_m'), ' s', 2)}",
    "", "", "", None)
row("aggregator", "events/s into ClickHouse; CPU s per million", f"{fmt(g('aggregator.rps'))}; {fmt(g('aggregator.cpu_s_per_m'), ' s', 2)}",
    "", "", "", None)
row("aggregator", "rows written per million events: usage cells; de-duplication ids",
    f"{fmt(g('aggregator.cell_rows_per_m'))}; {fmt(g('aggregator.id_rows_per_m'))}", "", "", "", None)
row("enforcer", "following the topic: events/s; CPU s per million",
    f"{fmt(g('enforcer.follow.rps'))}; {fmt(g('enforcer.follow.cpu_s_per_m'), ' s', 2)}", "", "", "", None)
p = g("query.period.p99_ms")
row("query API", "period summary (every meter) over 10M cells, p50 / p99",
    f"{fmt(g('query.period.p50_ms'), '', 1)} / {fmt(p, ' ms', 1)}", "", "", "p99 < 100 ms", None if p is None else p < 100)
for key, what in [("meter_period", "one meter's period usage"), ("hourly", "7-day hourly series"),
                  ("minute_csv", "7-day minute series as CSV"), ("top", "top 10 customers of the month"),
                  ("totals", "totals per meter of the month")]:
    row("query API", f"{what} over 10M cells, p50 / p99",
        f"{fmt(g(f'query.{key}.p50_ms'), '', 1)} / {fmt(g(f'query.{key}.p99_ms'), ' ms', 1)}", "", "", "", None)
for where in ["clickhouse", "enforcer"]:
    p99 = g(f"freshness.{where}.p99_ms")
    row("freshness", f"202 -> visible in {'ClickHouse' if where == 'clickhouse' else 'the enforcer'}, p50 / p99",
        f"{fmt(g(f'freshness.{where}.p50_ms'))} / {fmt(p99, ' ms')}", "", "", "p99 < 1 s", None if p99 is None else p99 < 1000)

print(f"Machine: {cores} cores, {mem} GiB; load generators, broker, ClickHouse and Tally share them. "
      f"{minutes} minutes for the whole run; CPU time taken by the hypervisor's other guests (steal): {steal} %.")
print()
print("| area | measure | Tally | baseline (same run) | ratio | goal | met |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))

sizes = sorted({int(k.split(".")[2]) for k in r if k.startswith("growth.customers.")})
if sizes:
    print()
    print("Cost growth with customers (1M events per step):")
    print()
    print("| customers | ingest events/s | aggregator events/s | aggregator peak memory | enforcer memory | period summary p99 |")
    print("|---|---|---|---|---|---|")
    for c in sizes:
        k = lambda name: g(f"growth.customers.{c}.{name}")
        print(f"| {c:,} | {fmt(k('ingest_rps'))} | {fmt(k('aggregator_rps'))} | {fmt(k('aggregator_peak_mib'), ' MiB')} "
              f"| {fmt(k('enforcer_mib'), ' MiB')} | {fmt(k('period_p99_ms'), ' ms', 1)} |")
sizes = sorted({int(k.split(".")[2]) for k in r if k.startswith("growth.events.")})
if sizes:
    print()
    print("Cost growth with stored events (1,000 customers; one event per per-minute cell, the worst case):")
    print()
    print("| stored events | period summary p99 | aggregator events/s on top |")
    print("|---|---|---|")
    for n in sizes:
        print(f"| {n:,} | {fmt(g(f'growth.events.{n}.period_p99_ms'), ' ms', 1)} | {fmt(g(f'growth.events.{n}.aggregator_rps'))} |")
PY
echo
echo "Raw outputs: $OUT"
