#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need
# (deploy/install-deps.sh --tests; arguments go to it, e.g. --rustup on a machine
# without Rust), checks formatting and lints, and runs every test against
# real etcd processes that the tests start themselves on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh --tests "$@"
# Where rustup puts cargo, should this shell not have it on PATH yet.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
