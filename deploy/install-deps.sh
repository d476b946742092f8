#!/usr/bin/env bash
# Installs what building and testing coord needs and a fresh Debian/Ubuntu
# machine lacks, from the distribution's packages:
#   etcd     (etcd-server)        the tests, `coord dev` and the quickstart run it
#   etcdctl  (etcd-client)        the peer side of tests and benchmarks
#   protoc   (protobuf-compiler)  etcd-client's build compiles etcd's .proto files
# and, with rustup, the wasm32-wasip2 target (the WASM hook tests build the
# plugins in plugins/ for it).
# Rust itself comes from rustup (Debian's rustc is too old); see README.md.
set -euo pipefail

missing=()
if [ -z "${ETCD_BIN:-}" ] && ! command -v etcd >/dev/null 2>&1; then missing+=(etcd-server); fi
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found. Install Rust with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi

if [ ! -d "$(rustc --print sysroot)/lib/rustlib/wasm32-wasip2" ]; then
  if command -v rustup >/dev/null 2>&1; then
    echo "install-deps: adding the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
  else
    echo "install-deps: the wasm32-wasip2 target is missing and rustup is not here to add it; the WASM hook tests will fail." >&2
  fi
fi
