#!/usr/bin/env bash
# Zero to a running agent: installs etcd (and protoc for the build) if
# missing, builds coord, and runs `coord dev`, which starts a local etcd on
# free loopback ports and runs the agent on agent.toml.example against it.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --release --locked
exec ./target/release/coord dev agent.toml.example
