#!/usr/bin/env bash
# Builds the Debian package: target/debian/dynamodb-cdc_<version>-1_<arch>.deb.
#
#   packaging/build-deb.sh               release build + package
#   packaging/build-deb.sh --no-build    package the existing target/release/dynamodb-cdc
#
# Every argument is passed on to `cargo deb` (e.g. --no-build, --fast, --deb-revision 2).
# cargo-deb itself is installed on first use, outside the repo, into
# ${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc/cargo-deb, and reused from there.
# The package's contents are [package.metadata.deb] in Cargo.toml; its maintainer
# scripts are packaging/debian/. The last line printed is the path of the .deb.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0 # builds with rust 1.85+ (the repo pins 1.95.0)

cd "$(dirname "$0")/.."

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
CARGO_DEB_ROOT="$CACHE_DIR/cargo-deb"
CARGO_DEB="$CARGO_DEB_ROOT/bin/cargo-deb"

# cargo-deb runs dpkg-shlibdeps (Depends: libc6 ...), strip and objcopy (the -dbgsym .ddeb).
for tool in dpkg-shlibdeps strip objcopy; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-deb: $tool not found: sudo apt-get install dpkg-dev binutils" >&2
        exit 1
    fi
done

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

t0=$(now)
if [ -x "$CARGO_DEB" ] && "$CARGO_DEB" --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    echo "build-deb: cargo-deb $CARGO_DEB_VERSION from $CARGO_DEB_ROOT" >&2
else
    echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION into $CARGO_DEB_ROOT" >&2
    mkdir -p "$CARGO_DEB_ROOT"
    cargo install cargo-deb --locked --version "=$CARGO_DEB_VERSION" --root "$CARGO_DEB_ROOT" --force
    echo "build-deb: cargo-deb installed in $(elapsed "$t0")" >&2
fi

t1=$(now)
# cargo-deb runs `cargo build --release` (unless --no-build), strips the binary into the
# .deb and moves its debug info into the -dbgsym .ddeb (dbgsym = true in Cargo.toml), and
# prints the paths on stdout: the .ddeb first, the .deb last.
out=$(PATH="$CARGO_DEB_ROOT/bin:$PATH" cargo deb "$@")
deb=$(printf '%s\n' "$out" | tail -n 1)
case "$deb" in
*.deb) ;;
*) deb= ;;
esac
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "build-deb: cargo deb did not print the path of a .deb (got: $out)" >&2
    exit 1
fi
printf '%s\n' "$out" | grep '\.ddeb$' | sed 's/^/build-deb: debug symbols: /' >&2 || true
echo "build-deb: cargo deb took $(elapsed "$t1"), $(elapsed "$t0") in all" >&2
printf '%s\n' "$deb"
