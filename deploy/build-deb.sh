#!/usr/bin/env bash
# Builds the Debian package: target/debian/coord_<version>-1_<arch>.deb.
#
# It builds coord with the dist profile (fat LTO: about 10 minutes on 2
# cores), has the binary generate its shell completions and man pages, puts
# the systemd unit (pointing at /usr/bin/coord, where the package installs
# the binary) and the sysusers file where cargo-deb looks for them, and runs
# cargo-deb (`cargo install cargo-deb --locked` if missing; it is a tool,
# not a dependency). What goes where: [package.metadata.deb] in Cargo.toml.
#
#   bash deploy/build-deb.sh && sudo dpkg -i target/debian/coord_*.deb
#
# `build-deb.sh --assets COORD DIR` only generates into DIR what
# target/deb-assets/ holds, with the given binary (tests/it/packaging.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

generate_assets() {
  local coord=$1 dir=$2
  mkdir -p "$dir/completions" "$dir/man" "$dir/systemd"
  "$coord" completions bash >"$dir/completions/coord"
  "$coord" completions zsh >"$dir/completions/_coord"
  "$coord" completions fish >"$dir/completions/coord.fish"
  "$coord" man --dir "$dir/man"
  gzip -9nf "$dir"/man/*.1
  # The packaged unit: the binary where the package puts it, and without
  # the comment on installing by hand.
  sed -e '/^# Install (see README.md/,/^#$/d' -e 's#/usr/local/bin/coord#/usr/bin/coord#g' \
    deploy/systemd/coord.service >"$dir/systemd/coord.service"
  cp deploy/systemd/coord.sysusers.conf "$dir/systemd/coord.sysusers"
}

if [ "${1:-}" = "--assets" ]; then
  generate_assets "$2" "$3"
  exit 0
fi

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: cargo-deb not found; install it with \`cargo install cargo-deb --locked\`." >&2
  exit 1
fi

# build.rs names the checkout's commit in `coord --version`; from a tree
# without .git, set COORD_COMMIT.
cargo build --locked --profile dist --bin coord
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

rm -rf target/deb-assets
generate_assets "$target_dir/dist/coord" target/deb-assets
# The profile (dist) comes from [package.metadata.deb].
cargo deb --no-build
