#!/usr/bin/env bash
# Zero to a running agent: installs what the build needs if missing
# (deploy/install-deps.sh; arguments go to it, e.g. --rustup on a machine
# without Rust), builds coord, and runs `coord dev`, which starts a local
# etcd on free loopback ports and runs the agent on agent.toml.example
# against it. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh "$@"
# Where rustup puts cargo, should this shell not have it on PATH yet.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
cargo build --release --locked
exec ./target/release/coord dev agent.toml.example
