#!/usr/bin/env bash
# Alternated A/B runs of `billcl bench` on the default cluster, each run from the same copy of
# the data (docs/performance.md, "How to measure"): runs one after the other on one cluster
# drift by 10 %, and the machine's moment moves a p99 by ±0.3 ms, so only alternated runs from
# one copy compare two builds.
#
#   scripts/bench-pairs.sh [options] BIN_A BIN_B -- BENCH_ARGS…
#
#   BIN_A, BIN_B   the two billcl binaries (copy them aside: a rebuild replaces target/release)
#   BENCH_ARGS     what `billcl bench` gets, e.g. add_money --rate 17500 --duration 20
#   --pairs N      pairs to run (default 3); the order within a pair alternates, B first in odd
#   --accounts N   accounts created once, before the pairs (default 100000)
#   --config FILE  the cluster file (default: the repository's cluster.toml)
#
# Every run starts the cluster from a fresh copy of the saved data, benches with `--no-create`,
# stops it and prints one line: build, calls/s, latency percentiles, cluster CPU per call. As
# root the cluster runs in a network namespace of its own (nothing else shares its ports);
# otherwise on this host's 127.0.0.1, so no other cluster may use its ports meanwhile. The
# scratch directory and namespace are removed at the end, and only the PIDs started here are
# stopped (by `billcl stop` in the scratch directory).
set -euo pipefail

pairs=3
accounts=100000
root="$(cd "$(dirname "$0")/.." && pwd)"
config="$root/cluster.toml"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --pairs) pairs="$2"; shift 2 ;;
        --accounts) accounts="$2"; shift 2 ;;
        --config) config="$2"; shift 2 ;;
        --) shift; break ;;
        -*) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $# -lt 3 || "$3" != "--" ]]; then
    echo "usage: $0 [--pairs N] [--accounts N] [--config FILE] BIN_A BIN_B -- BENCH_ARGS…" >&2
    exit 2
fi
bin_a="$(realpath "$1")"
bin_b="$(realpath "$2")"
shift 3
bench_args=("$@")
for bin in "$bin_a" "$bin_b"; do
    [[ -x "$bin" ]] || { echo "$bin is not an executable billcl" >&2; exit 2; }
done

scratch="$(mktemp -d -t billcl-pairs.XXXXXX)"
netns=""
run() { if [[ -n "$netns" ]]; then ip netns exec "$netns" "$@"; else "$@"; fi; }
cleanup() {
    (cd "$scratch" && run "$bin_a" stop >/dev/null 2>&1) || true
    [[ -n "$netns" ]] && ip netns del "$netns" 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
if [[ $EUID -eq 0 ]] && command -v ip >/dev/null; then
    netns="billcl-pairs-$$"
    ip netns add "$netns"
    ip netns exec "$netns" ip link set lo up
fi
cp "$config" "$scratch/cluster.toml"
cd "$scratch"

echo "# seeding $accounts accounts with $(basename "$bin_a") in $scratch${netns:+ (netns $netns)}"
run "$bin_a" start >/dev/null
run "$bin_a" bootstrap >/dev/null
run "$bin_a" bench add_money --accounts "$accounts" --duration 1 >/dev/null 2>&1
run "$bin_a" stop >/dev/null
mv data data.saved

one_run() {
    local label="$1" bin="$2"
    rm -rf data
    cp -a data.saved data
    run "$bin" start >/dev/null
    sleep 1
    local out
    out="$(run "$bin" bench "${bench_args[@]}" --accounts "$accounts" --no-create 2>/dev/null || true)"
    run "$bin" stop >/dev/null
    local throughput latency cpu
    throughput="$(grep -o 'throughput *[0-9]* calls/s' <<<"$out" | tr -s ' ' || true)"
    latency="$(grep -o 'p50.*max [0-9.]*' <<<"$out" | tr -s ' ' || true)"
    cpu="$(grep -o 'cluster [0-9.]* µs/call' <<<"$out" || true)"
    echo "$label  ${throughput:-no answer}  ${latency:-}  ${cpu:-}"
}

echo "# A = $bin_a"
echo "# B = $bin_b"
echo "# bench ${bench_args[*]}"
for ((pair = 1; pair <= pairs; pair++)); do
    if ((pair % 2 == 1)); then
        one_run B "$bin_b"
        one_run A "$bin_a"
    else
        one_run A "$bin_a"
        one_run B "$bin_b"
    fi
done
