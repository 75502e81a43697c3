#!/usr/bin/env bash
# A bounded fuzz run of every billcl-proto decoder: each target runs for SECONDS (default 60).
#
#   host/proto/fuzz/run.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz wants a nightly compiler for
# -Zsanitizer; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept those flags. Findings are
# written to host/proto/fuzz/artifacts/TARGET/ and the run fails; the corpus grows in
# host/proto/fuzz/corpus/TARGET/ (both ignored by git). Not part of .ci/run: three targets at a
# minute each is longer than CI should take; run it before touching host/proto/src.
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in frame_decode request_decode response_decode; do
    echo "== $target: ${seconds} s"
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=65536 \
        2>&1 | grep -E "^(#[0-9]+ +(DONE|INITED)|Done|==[0-9]+==|SUMMARY|artifact|thread)" || true
    if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
        echo "$target: findings in host/proto/fuzz/artifacts/$target" >&2
        exit 1
    fi
done
echo "all fuzz targets ran clean for ${seconds} s each"
