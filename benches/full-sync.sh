#!/bin/bash
# Time a full initial sync between two repd on loopback.
#
#   benches/full-sync.sh BINDIR [data|sparse] [RATE]
#
# BINDIR holds repd and repctl (e.g. target/release). `data` fills the
# source with random data first (set SRC=file to reuse one; it is copied),
# `sparse` leaves it a hole (all zeros). RATE is `[sync] rate` ("0" =
# unlimited). Prints the seconds from `primary --force` until `wait-sync`
# returned on the target, whether the data areas are identical, and the
# source's counters. Stops the repd it started by PID and removes its
# directory on exit.
set -euo pipefail
BIN=$(cd "$1" && pwd); MODE=${2:-data}; RATE=${3:-0}
SIZE=${SIZE:-1G}
D=$(mktemp -d "${WORKDIR:-/tmp}/full-sync.XXXX")
PA=; PB=
cleanup() { [ -n "$PA" ] && kill "$PA" 2>/dev/null; [ -n "$PB" ] && kill "$PB" 2>/dev/null; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
cd "$D"
truncate -s "$SIZE" a.img b.img
if [ "$MODE" = data ]; then
    if [ -n "${SRC:-}" ]; then cp "$SRC" a.img; else head -c "$SIZE" /dev/urandom > a.img; fi
    sync a.img
fi
P1=$((20000 + RANDOM % 20000)); P2=$((P1 + 1))
cat > pair.toml <<TOML
[resource]
name = "r1"
fencing = "dont-care"
[sync]
rate = "$RATE"
[[node]]
name = "alpha"
address = "127.0.0.1:$P1"
disk = "$D/a.img"
nbd = "unix:$D/a.nbd"
control = "$D/a.ctl"
[[node]]
name = "beta"
address = "127.0.0.1:$P2"
disk = "$D/b.img"
nbd = "unix:$D/b.nbd"
control = "$D/b.ctl"
TOML
ctl() { "$BIN/repctl" --config pair.toml --node "$@"; }
ctl alpha create-md >/dev/null
ctl beta create-md >/dev/null
"$BIN/repd" --config pair.toml --node alpha 2>a.log & PA=$!
"$BIN/repd" --config pair.toml --node beta 2>b.log & PB=$!
for _ in $(seq 100); do [ -S a.ctl ] && [ -S b.ctl ] && break; sleep 0.1; done
ctl alpha wait-connect --timeout 20s
t0=$(date +%s.%N)
ctl alpha primary --force >/dev/null
ctl beta wait-sync --timeout 600s >/dev/null </dev/null
t1=$(date +%s.%N)
ctl alpha status --json > a.status
size=$(python3 -c "import json; print(json.load(open('a.status'))['size_bytes'])")
if cmp -s -n "$size" a.img b.img; then same=identical; else same=DIFFERENT; fi
echo "mode=$MODE rate=$RATE bin=$BIN secs=$(echo "$t1 - $t0" | bc) data=$same"
python3 -c "import json; print(json.load(open('a.status'))['counters'])"
