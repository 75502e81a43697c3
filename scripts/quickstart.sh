#!/usr/bin/env bash
# The README's first command: set up, build, start the default cluster (cluster.toml)
# and run the seed session against it. Leaves the cluster running: `billcl stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release
billcl() { echo "\$ billcl $*"; target/release/billcl "$@"; }
billcl start
billcl status
echo "waiting for the replicasets to elect their leaders..."
for _ in $(seq 1 60); do
    target/release/billcl procedures >/dev/null 2>&1 && break
    sleep 1
done
if ! target/release/billcl info --json | grep -q '"available_rw": 1000'; then
    billcl bootstrap
fi
billcl info
billcl route 4
billcl call insert_data
billcl call get 4
billcl call add_money 4 1000
billcl call get 4
billcl call update_velocity 4 100
billcl call get 4
sleep 2
billcl call get 4
billcl call --replica get 4
billcl call update_velocity 4 0
billcl procedures
echo
echo "The cluster is running. Try: target/release/billcl connect   (stop it with: target/release/billcl stop)"
