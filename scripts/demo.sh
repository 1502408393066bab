#!/usr/bin/env bash
# Tandem demo: build, create a 1 GiB backing file, write metadata, start repd,
# promote it, and use the export with real NBD clients. Leaves repd running
# in the foreground of this script until Ctrl-C, then stops it cleanly.
#
#   ./scripts/demo.sh            # everything under ./demo/
#   DEMO_DIR=/tmp/x ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "Rust is not installed: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 1
fi
if ! command -v nbdinfo >/dev/null || ! command -v qemu-io >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq libnbd-bin qemu-utils
    else
        echo "please install the NBD clients: sudo apt-get install -y libnbd-bin qemu-utils" >&2
        exit 1
    fi
fi

cargo build --release --bins
bin=$PWD/target/release
dir=${DEMO_DIR:-$PWD/demo}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

cat > "$dir/r0.toml" <<TOML
[resource]
name = "r0"

[[node]]
name = "alpha"
address = "127.0.0.1:7788"
disk = "$dir/alpha.img"
nbd = "unix:$dir/alpha.nbd"
control = "$dir/alpha.ctl"
TOML
export TANDEM_CONFIG=$dir/r0.toml

if [ ! -e "$dir/alpha.img" ]; then
    truncate -s 1G "$dir/alpha.img"
    "$bin/repctl" create-md
fi
"$bin/repd" --config "$TANDEM_CONFIG" 2>"$dir/repd.log" &
repd=$!
trap 'kill -TERM $repd 2>/dev/null; wait $repd 2>/dev/null' EXIT
for _ in $(seq 100); do "$bin/repctl" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/repctl" primary --force
"$bin/repctl" status

uri="nbd+unix:///r0?socket=$dir/alpha.nbd"
echo; echo "== nbdinfo $uri"; nbdinfo "$uri"
echo; echo "== qemu-io: write a pattern with FUA, read it back, flush"
qemu-io -f raw "$uri" -c "write -f -P 0x5a 0 1M" -c "read -P 0x5a 0 1M" -c flush
echo
echo "repd is serving $uri (log: $dir/repd.log). Try, in another shell:"
echo "  export TANDEM_CONFIG=$dir/r0.toml"
echo "  $bin/repctl status"
echo "  qemu-io -f raw '$uri' -c 'read -v 0 64'"
echo "  nbdcopy /dev/urandom '$uri'  # (any libnbd tool works)"
echo "Ctrl-C stops repd cleanly."
wait $repd
