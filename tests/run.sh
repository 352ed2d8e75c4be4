#!/usr/bin/env bash
# Runs Tally's whole test suite: formatting, lints, and every test of every crate (unit tests,
# the end-to-end tests in tests/, the README walk-through and the kill -9 test against the real
# binary). The embedded pipeline needs no external server; the tests start what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
