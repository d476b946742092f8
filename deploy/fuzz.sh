#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for MINUTES each (default 10), one after
# the other, one process at a time. Crashes land in fuzz/artifacts/<target>/;
# what the fuzzer learnt stays in fuzz/corpus/<target>/ for the next run.
#
#   bash deploy/fuzz.sh [minutes-per-target]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler
# (libFuzzer is built from source). Works on the stable toolchain:
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address), which
# RUSTC_BOOTSTRAP=1 lets stable rustc accept. The first build compiles
# coord and all its dependencies instrumented, in release mode, into
# fuzz/target: expect tens of minutes on two cores (wasmtime, cranelift).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
minutes="${1:-10}"
TARGETS=(manifest hook_event template)
if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target"
    dict=()
    if [[ -f "$target.dict" ]]; then
        dict=("-dict=$target.dict")
    fi
    echo "== fuzzing $target for $minutes minute(s)"
    cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$((minutes * 60))" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${dict[@]}"
done
