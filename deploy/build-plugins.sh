#!/usr/bin/env bash
# Builds the WASM hook plugins in plugins/ (the examples and the test
# fixture) for wasm32-wasip2, in release, and says where the components are.
# Adds the wasm32-wasip2 target with rustup if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustc --print target-list >/dev/null 2>&1; then
  echo "build-plugins: rustc not found. Install Rust with rustup (https://rustup.rs)." >&2
  exit 1
fi
sysroot="$(rustc --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/wasm32-wasip2" ]; then
  if ! command -v rustup >/dev/null 2>&1; then
    echo "build-plugins: the wasm32-wasip2 target is missing and rustup is not here to add it." >&2
    exit 1
  fi
  echo "build-plugins: adding the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi

# The plugins keep their own target dir, whatever CARGO_TARGET_DIR says.
export CARGO_TARGET_DIR="$PWD/plugins/target"
cargo build --locked --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

echo "Plugins built:"
for f in plugins/target/wasm32-wasip2/release/*.wasm; do
  printf '  %s (%s bytes)\n' "$f" "$(wc -c <"$f")"
done
