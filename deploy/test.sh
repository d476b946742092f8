#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (etcd,
# protoc), checks formatting and lints, and runs every test against real
# etcd processes that the tests start themselves on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
