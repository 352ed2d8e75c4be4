#!/usr/bin/env bash
# Runs Tally's fuzz targets (cargo fuzz, libFuzzer) from the committed seed corpus.
#
#   fuzz/run.sh smoke            every target for 100,000 executions (tests/run.sh runs this)
#   fuzz/run.sh full [RUNS]      every target for RUNS executions (default 10,000,000); prints
#                                one line of figures per target for fuzz/README.md
#   fuzz/run.sh TARGET [RUNS]    one target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`; tests/run.sh installs it) and uses the stable
# toolchain with RUSTC_BOOTSTRAP=1 for the sanitizer-coverage flags. Built without a sanitizer
# (`-s none`, the code is safe Rust): crashes are panics, assertion failures, timeouts (-timeout)
# and allocations over 512 MB (-malloc_limit_mb), which libFuzzer reports as failures.
# New inputs go to a working corpus outside the repository ($TALLY_FUZZ_WORK).
set -euo pipefail
cd "$(dirname "$0")"
targets=(event_json event_batch event_ndjson stripe_webhook grpc_check)
mode="${1:-smoke}"
case "$mode" in
smoke) runs=100000; selected=("${targets[@]}") ;;
full) runs="${2:-10000000}"; selected=("${targets[@]}") ;;
*) runs="${2:-10000000}"; selected=("$mode") ;;
esac
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${TALLY_FUZZ_TARGET_DIR:-$HOME/.cache/tally/fuzz-target}"
work="${TALLY_FUZZ_WORK:-$HOME/.cache/tally/fuzz-work}"
cargo fuzz build -s none -O
for t in "${selected[@]}"; do
    mkdir -p "$work/$t"
    log="$work/$t.log"
    start=$(date +%s)
    if ! cargo fuzz run -s none -O "$t" "$work/$t" "corpus/$t" -- \
        -runs="$runs" -timeout=10 -malloc_limit_mb=512 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $t FAILED (log: $log)" >&2
        exit 1
    fi
    secs=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
    corpus=$(find "$work/$t" -type f | wc -l)
    peak=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "$t: $execs executions in ${secs}s, coverage $cov edges, working corpus $corpus inputs, peak RSS ${peak} MB, no failure"
done
