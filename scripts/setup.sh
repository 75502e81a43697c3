#!/usr/bin/env bash
# Installs what building billcl needs on Debian 12, idempotently:
# - Debian's rustc-web toolchain, rust-web-src and lld-19, which build the wasm procedures
#   (rustup cannot fetch the wasm32 target here); the node itself builds with rustup's stable.
# - gcc: the linker rustc calls, and the C compiler of ring (TLS) and mimalloc (the allocator).
set -euo pipefail
need=()
for pkg in rustc-web cargo-web rust-web-src lld-19 gcc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (rustup stable) is required" >&2; exit 1; }
