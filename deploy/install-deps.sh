#!/usr/bin/env bash
# Installs what building coord, running it and its benchmarks, and (with
# --tests) running its test suite needs and a fresh Debian/Ubuntu machine
# lacks, from the distribution's packages. Each need is checked by what it
# must be able to do, not by a command's name, so a machine that has half
# of something (protoc without its include files) is repaired:
#
#   a C toolchain  (gcc, libc6-dev)    rustc links with `cc`; ring and wasmtime
#                                      compile C in their build scripts
#   protoc         (protobuf-compiler, etcd-client's build compiles etcd's .proto
#                   libprotobuf-dev)   files, which import google/protobuf/*.proto
#   etcd, etcdctl  (etcd-server,       `coord dev`, the quickstart, the tests and
#                   etcd-client)       the benchmarks run them
#   dnsperf, dnsmasq (dnsperf,         `coord-bench dns` loads coord's DNS server
#                   dnsmasq-base)      and dnsmasq, its peer, with dnsperf
# and with --tests (deploy/test.sh):
#   systemd-analyze (systemd)          tests/it/deploy.rs verifies the unit
#   man            (man-db)            tests/it/cli.rs renders `coord man`
#   dig            (dnsutils)          tests/it/dns.rs asks the agent's DNS server
#   Go, etcd's     (golang-go,         tests/it/interop.rs builds a grpc-go
#   resolver and    golang-etcd-server-dev,   client (tests/interop/grpc-go) in
#   grpc-go         golang-google-grpc-dev)   GOPATH mode, without network
#                                      (about 160 MB to download)
#   libfaketime    (faketime)          tests/it/faults.rs steps the agent's
#                                      wall clock through a timestamp file
#
# Rust itself comes from rustup (Debian's rustc is too old). Without cargo
# this script installs the packages above and then stops, saying so; with
# --rustup it installs Rust (minimal profile, clippy, rustfmt) into
# ~/.cargo with rustup-init from static.rust-lang.org, checked against its
# published SHA-256, without editing shell profiles. Either way it adds the
# wasm32-wasip2 target (the WASM hook tests build plugins/ for it).
set -euo pipefail

with_rustup=0
with_tests=0
for arg in "$@"; do
  case $arg in
    --rustup) with_rustup=1 ;;
    --tests) with_tests=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument \`$arg\` (try --help)" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

can_compile_c() {
  printf 'int main(void) { return 0; }\n' >"$work/check.c"
  cc "$work/check.c" -o "$work/check" >/dev/null 2>&1 && "$work/check"
}

# prost-build runs $PROTOC if set, else protoc from PATH.
can_compile_protos() {
  mkdir -p "$work/proto"
  cat >"$work/proto/check.proto" <<'EOF'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
message Check { google.protobuf.FileDescriptorProto file = 1; }
EOF
  "${PROTOC:-protoc}" -I "$work/proto" --descriptor_set_out=/dev/null "$work/proto/check.proto" >/dev/null 2>&1
}

can_run_etcd() { "${ETCD_BIN:-etcd}" --version >/dev/null 2>&1; }
can_run_etcdctl() { etcdctl version >/dev/null 2>&1; }
can_verify_units() { systemd-analyze --version >/dev/null 2>&1; }
can_load_dns() { dnsperf -h >/dev/null 2>&1; }
can_serve_dns_peer() { dnsmasq --version >/dev/null 2>&1; }
can_ask_dns() { dig -v >/dev/null 2>&1; }

can_render_man_pages() {
  printf '.TH CHECK 1\n.SH NAME\ncheck \\- a page\n' >"$work/check.1"
  man -l "$work/check.1" >/dev/null 2>&1
}

# The same build the integration test does: GOPATH mode, Debian's sources.
can_build_grpc_go_client() {
  GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= \
    go list go.etcd.io/etcd/clientv3/naming/resolver google.golang.org/grpc/health/grpc_health_v1 >/dev/null 2>&1
}

# As the test uses it: preloaded from the multiarch directory, reading
# its offset from FAKETIME_TIMESTAMP_FILE.
can_fake_the_clock() {
  local lib
  for lib in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    [ -f "$lib" ] || continue
    echo "@2000-01-01 00:00:00" >"$work/faketime"
    [ "$(LD_PRELOAD=$lib FAKETIME_TIMESTAMP_FILE="$work/faketime" FAKETIME_NO_CACHE=1 date -u +%Y 2>/dev/null)" = 2000 ] && return 0
  done
  return 1
}

missing=()
can_compile_c || missing+=(gcc libc6-dev)
can_compile_protos || missing+=(protobuf-compiler libprotobuf-dev)
can_run_etcd || missing+=(etcd-server)
can_run_etcdctl || missing+=(etcd-client)
can_load_dns || missing+=(dnsperf)
can_serve_dns_peer || missing+=(dnsmasq-base)
if [ $with_tests = 1 ]; then
  can_verify_units || missing+=(systemd)
  can_ask_dns || missing+=(dnsutils)
  can_render_man_pages || missing+=(man-db)
  can_build_grpc_go_client || missing+=(golang-go golang-etcd-server-dev golang-google-grpc-dev)
  can_fake_the_clock || missing+=(faketime)
fi

cargo_home=${CARGO_HOME:-$HOME/.cargo}
if ! command -v cargo >/dev/null 2>&1 && [ -x "$cargo_home/bin/cargo" ]; then
  export PATH="$cargo_home/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1 && [ $with_rustup = 1 ]; then
  command -v curl >/dev/null 2>&1 || missing+=(curl)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Installed but still unable: say which, rather than fail later in a build.
failed=()
can_compile_c || failed+=("cc cannot compile and link a C program")
can_compile_protos || failed+=("${PROTOC:-protoc} cannot compile a file importing google/protobuf/descriptor.proto")
can_run_etcd || failed+=("${ETCD_BIN:-etcd} does not run")
can_run_etcdctl || failed+=("etcdctl does not run")
can_load_dns || failed+=("dnsperf does not run")
can_serve_dns_peer || failed+=("dnsmasq does not run")
if [ $with_tests = 1 ]; then
  can_verify_units || failed+=("systemd-analyze does not run")
  can_ask_dns || failed+=("dig does not run")
  can_render_man_pages || failed+=("man -l cannot render a page")
  can_build_grpc_go_client || failed+=("go cannot find etcd's resolver and grpc-go in /usr/share/gocode")
  can_fake_the_clock || failed+=("libfaketime cannot fake a process's clock from a timestamp file")
fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'install-deps: still missing after installing: %s\n' "${failed[@]}" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ $with_rustup = 0 ]; then
    echo "install-deps: cargo not found. Install Rust with rustup (https://rustup.rs) and run this again, or run it again with --rustup to have that done here." >&2
    exit 1
  fi
  triple="$(uname -m)-unknown-linux-gnu"
  url="https://static.rust-lang.org/rustup/dist/$triple/rustup-init"
  echo "install-deps: installing Rust with rustup-init from $url" >&2
  if ! curl --proto '=https' --tlsv1.2 -sSf -o "$work/rustup-init" "$url" ||
    ! curl --proto '=https' --tlsv1.2 -sSf -o "$work/rustup-init.sha256" "$url.sha256"; then
    echo "install-deps: could not download rustup-init; install Rust by hand (https://rustup.rs)." >&2
    exit 1
  fi
  (cd "$work" && echo "$(cut -d' ' -f1 rustup-init.sha256)  rustup-init" | sha256sum --check --quiet)
  chmod +x "$work/rustup-init"
  "$work/rustup-init" -y --quiet --no-modify-path --profile minimal \
    --component clippy --component rustfmt --target wasm32-wasip2
  export PATH="$cargo_home/bin:$PATH"
  echo "install-deps: Rust is in $cargo_home/bin; add it to PATH (\`. $cargo_home/env\`)." >&2
fi

if [ ! -d "$(rustc --print sysroot)/lib/rustlib/wasm32-wasip2" ]; then
  if command -v rustup >/dev/null 2>&1; then
    echo "install-deps: adding the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
  else
    echo "install-deps: the wasm32-wasip2 target is missing and rustup is not here to add it; the WASM hook tests will fail." >&2
  fi
fi
