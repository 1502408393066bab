#!/usr/bin/env bash
# Compare repd with nbdkit and qemu-nbd on durable NBD work: single-node
# repd, and a replicated repd pair (issue 3).
#
# One backing file, served in turn (never concurrently) by:
#   repd-direct    repd --engine io-uring --io direct   (O_DIRECT)
#   repd-buffered  repd --engine io-uring --io buffered (page cache)
#   repd-pair-direct, repd-pair-buffered
#                  two repd (alpha, beta) on loopback, protocol C: alpha is
#                  Primary on the backing file, beta Secondary on a second
#                  file on the same disk; both create-md --force, alpha
#                  primary --force, full initial sync (wait-sync) before
#                  the rows. After the rows: both Connected/UpToDate with
#                  nothing out of sync, then both stopped and the two data
#                  areas compared byte for byte (cmp); a difference fails
#                  the run. CPU per op counts both daemons.
#   nbdkit         nbdkit file (defaults: cache=default, i.e. page cache)
#   qemu-nbd       qemu-nbd -f raw --cache=none (O_DIRECT) --aio=$QEMU_AIO
# all on a unix socket. Before the servers of each run, the loopback TCP
# round trip is measured (benches/tcprtt.c), for the replicated FLUSH
# breakdown in the report. Rows, per server:
#   flush_qd1        fio: 4 KiB random write + FLUSH, QD1 (fsync=1)
#   flush_qd1_libnbd nbdlat: the same pattern through libnbd (cross-check)
#   fua_qd1          nbdlat: 4 KiB random write with FUA, QD1
#   randwrite_qd32   fio: 4 KiB random write, QD32, FLUSH at the end
#   seqwrite_1m      fio: 1 MiB sequential write, FLUSH every 64 MiB and at the end
#   seqread_1m       fio: 1 MiB sequential read, page cache dropped first
# Results: a ratio table on stdout; CSV, raw fio/nbdlat JSON and the report
# in $OUT (bench-out/, gitignored). Run as root (it drops the page cache).
# See docs/benchmarks.md for what each row means and the measured results.
#
# Environment (defaults in brackets):
#   SIZE [2G]          backing file size (numfmt --from=iec syntax)
#   RUNTIME [20]       seconds per time-based row
#   RAMP [2]           unrecorded warm-up seconds of the QD1 latency rows
#   XCHECK_RUNTIME [RUNTIME/2]  seconds of the libnbd write+FLUSH cross-check
#   SEQ_QD [8]         queue depth of the 1 MiB sequential rows
#   REPEAT [1]         run every server this many times (for run-to-run spread)
#   SERVERS ["repd-direct repd-buffered nbdkit qemu-nbd"]; also accepted:
#                      repd-direct-threads, repd-buffered-threads (--engine threads),
#                      repd-pair-direct, repd-pair-buffered (replicated pair);
#                      issue 3: SERVERS="repd-pair-direct repd-direct nbdkit"
#   PAIR_SYNC_TIMEOUT [600s]  how long the pair's initial full sync may take
#   RTT_SECONDS [3]    seconds of the loopback round-trip measurement (0: skip)
#   QEMU_AIO [io_uring]  qemu-nbd --aio: io_uring or native
#   WORKDIR [/work]    where the temporary directory and backing file go
#   OUT [<repo>/bench-out]  results: results-<stamp>.csv, raw JSON, report
#   DROP_CACHES [1]    drop the page cache before each server and read row
#   HOGS [0]           run this many CPU-bound busy loops during the whole run
#                      (nice HOG_NICE [0]), to see how each server copes with
#                      a machine that is busy compiling
#   BUILD [1]          cargo build --release first (0: use the binaries as they are)
#   REPD_DIR [<repo>/target/release]  where repd and repctl are (for A/B runs)
#   BASE_DIR []        a second repd build for A/B in the same run: servers
#                      base-direct and base-buffered run $BASE_DIR/repd
#   ROWS [all]         which rows to run, e.g. "fua_qd1 randwrite_qd32" (quick A/B)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${SIZE:-2G}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
XCHECK_RUNTIME=${XCHECK_RUNTIME:-$(((RUNTIME + 1) / 2))}
SEQ_QD=${SEQ_QD:-8}
REPEAT=${REPEAT:-1}
SERVERS=${SERVERS:-"repd-direct repd-buffered nbdkit qemu-nbd"}
QEMU_AIO=${QEMU_AIO:-io_uring}
WORKDIR=${WORKDIR:-/work}
OUT=${OUT:-$ROOT/bench-out}
DROP_CACHES=${DROP_CACHES:-1}
BUILD=${BUILD:-1}
HOGS=${HOGS:-0}
HOG_NICE=${HOG_NICE:-0}
ROWS=${ROWS:-"flush_qd1 flush_qd1_libnbd fua_qd1 randwrite_qd32 seqwrite_1m seqread_1m"}
PAIR_SYNC_TIMEOUT=${PAIR_SYNC_TIMEOUT:-600s}
RTT_SECONDS=${RTT_SECONDS:-3}

REPD_DIR=${REPD_DIR:-$ROOT/target/release}
REPD=$REPD_DIR/repd
REPCTL=$REPD_DIR/repctl

# log, die, stop_pid, cleanup, wait_until, drop_caches, pid_ticks, free_port
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---- checks and build --------------------------------------------------------

for tool in fio nbdkit qemu-nbd nbdinfo gcc pkg-config jq python3 numfmt cmp; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install -y fio nbdkit qemu-utils libnbd-bin libnbd-dev gcc pkg-config jq python3)"
done
pkg-config --exists libnbd || die "needs libnbd-dev (apt-get install -y libnbd-dev)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
case $QEMU_AIO in io_uring | native) ;; *) die "QEMU_AIO must be io_uring or native" ;; esac
if [[ $DROP_CACHES == 1 && ! -w /proc/sys/vm/drop_caches ]]; then
    die "cannot write /proc/sys/vm/drop_caches (run as root, or DROP_CACHES=0 and say so in the results)"
fi

SIZE_BYTES=$(numfmt --from=iec "$SIZE")
mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$OUT/results-$STAMP.csv
RAW=$OUT/raw-$STAMP
mkdir -p "$RAW"
TMP=$(mktemp -d "$WORKDIR/tandem-bench.XXXXXX")

if [[ $BUILD == 1 ]]; then
    log "building repd and repctl (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin repd --bin repctl)
fi
[[ -x $REPD && -x $REPCTL ]] || die "no repd and repctl in $REPD_DIR"
NBDLAT=$TMP/nbdlat
# shellcheck disable=SC2046
gcc -O2 -Wall -Wextra -o "$NBDLAT" "$ROOT/benches/nbdlat.c" $(pkg-config --cflags --libs libnbd)
TCPRTT=$TMP/tcprtt
gcc -O2 -Wall -Wextra -pthread -o "$TCPRTT" "$ROOT/benches/tcprtt.c"


# ---- the backing file --------------------------------------------------------

IMG=$TMP/disk.img
log "creating $IMG: $SIZE_BYTES bytes of random data (fully allocated, no holes)"
# Written in full so that no server pays for allocating blocks or
# converting unwritten extents, and reads return real data.
head -c "$SIZE_BYTES" /dev/urandom | dd of="$IMG" bs=1M iflag=fullblock oflag=direct status=none
sync "$IMG"
FS_TYPE=$(findmnt -no FSTYPE -T "$IMG" 2>/dev/null || stat -f -c %T "$IMG")


SOCK=$TMP/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
CFG=$TMP/r0.toml
cat >"$CFG" <<EOF
[resource]
name = "r0"

[[node]]
name = "alpha"
address = "127.0.0.1:$(free_port)"
disk = "$IMG"
nbd = "unix:$SOCK"
control = "$TMP/alpha.ctl"
EOF
repctl() { "$REPCTL" --config "$CFG" --node alpha "$@"; }

# The replicated pair: alpha (Primary) on $IMG, serving $SOCK, and beta
# (Secondary) on its own file in the same directory, i.e. on the same disk.
IMG2=$TMP/disk-beta.img
PCFG=$TMP/pair.toml
if [[ " $SERVERS " == *" repd-pair-"* ]]; then
    # Sparse: the initial full sync of each pair run writes all of it.
    truncate -s "$SIZE_BYTES" "$IMG2"
    cat >"$PCFG" <<EOF
[resource]
name = "r0"
fencing = "dont-care"

[[node]]
name = "alpha"
address = "127.0.0.1:$(free_port)"
disk = "$IMG"
nbd = "unix:$SOCK"
control = "$TMP/pair-alpha.ctl"

[[node]]
name = "beta"
address = "127.0.0.1:$(free_port)"
disk = "$IMG2"
nbd = "unix:$TMP/beta.sock"
control = "$TMP/pair-beta.ctl"
EOF
fi
pctl() { "$REPCTL" --config "$PCFG" --node "$@"; }

# The extent every server is benchmarked on: repd's data area (the file minus
# its internal metadata at the end), so all servers touch the same bytes.
repctl create-md --force >/dev/null
DATA=$(repctl dump-md | jq -r '.size_bytes // empty')
if [[ -z $DATA ]]; then
    DATA=$SIZE_BYTES
    log "dump-md shows no data size; the extent is found from repd's status at the first start"
fi

# ---- servers -----------------------------------------------------------------

SERVER_PID=""
PEER_PID="" # the pair's Secondary

start_server() {
    local name=$1 run=$2
    rm -f "$SOCK"
    case $name in
    repd-pair-direct | repd-pair-buffered)
        local mode=${name#repd-pair-} n
        pctl alpha create-md --force >/dev/null
        pctl beta create-md --force >/dev/null
        "$REPD" --config "$PCFG" --node alpha --engine io-uring --io "$mode" \
            >"$TMP/$name-alpha.log" 2>&1 &
        SERVER_PID=$!
        PIDS+=("$SERVER_PID")
        "$REPD" --config "$PCFG" --node beta --engine io-uring --io "$mode" \
            >"$TMP/$name-beta.log" 2>&1 &
        PEER_PID=$!
        PIDS+=("$PEER_PID")
        for n in alpha beta; do
            wait_until "repd $n to answer" 20 pctl "$n" status --json
        done
        pctl alpha wait-connect --timeout 30s >/dev/null
        local t0 t1
        t0=$(date +%s.%N)
        pctl alpha primary --force >/dev/null 2>&1
        pctl alpha wait-sync --timeout "$PAIR_SYNC_TIMEOUT" >/dev/null ||
            die "$name: the initial sync did not finish within $PAIR_SYNC_TIMEOUT"
        t1=$(date +%s.%N)
        local st size
        st=$(pctl alpha status --json)
        size=$(jq -r '.size_bytes' <<<"$st")
        log "$name: initial full sync of $size bytes took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
        emit "$run" "$name" pair_sync mbps "$(awk -v a="$t0" -v b="$t1" -v n="$size" 'BEGIN { printf "%.1f", n / (b - a) / 1e6 }')" MB/s
        pair_check "$name"
        local direct
        direct=$(jq -r '.engine.direct_io' <<<"$st")
        [[ ($mode == direct && $direct == true) || ($mode == buffered && $direct == false) ]] ||
            die "repd --io $mode reports direct_io=$direct"
        ((size >= DATA)) || DATA=$size
        PEER_WRITTEN0=$(pctl beta status --json | jq -r '.counters.disk_written_bytes')
        ;;
    repd-direct | repd-buffered | repd-direct-threads | repd-buffered-threads | base-direct | base-buffered)
        local mode=${name#*-} engine=io-uring repd=$REPD
        if [[ $name == base-* ]]; then
            [[ -n ${BASE_DIR:-} && -x $BASE_DIR/repd ]] || die "$name needs BASE_DIR with a repd"
            repd=$BASE_DIR/repd
        fi
        if [[ $mode == *-threads ]]; then
            mode=${mode%-threads}
            engine=threads
        fi
        repctl create-md --force >/dev/null
        "$repd" --config "$CFG" --node alpha --engine "$engine" --io "$mode" \
            >"$TMP/$name.log" 2>&1 &
        SERVER_PID=$!
        PIDS+=("$SERVER_PID")
        wait_until "repd to answer" 20 repctl status --json
        repctl primary --force >/dev/null 2>&1
        local direct
        direct=$(repctl status --json | jq -r '.engine.direct_io')
        [[ ($mode == direct && $direct == true) || ($mode == buffered && $direct == false) ]] ||
            die "repd --io $mode reports direct_io=$direct"
        local size
        size=$(repctl status --json | jq -r '.size_bytes')
        ((size >= DATA)) || DATA=$size
        ;;
    nbdkit)
        nbdkit --foreground --exit-with-parent --unix "$SOCK" file file="$IMG" \
            >"$TMP/$name.log" 2>&1 &
        SERVER_PID=$!
        PIDS+=("$SERVER_PID")
        ;;
    qemu-nbd)
        qemu-nbd --format=raw --cache=none --aio="$QEMU_AIO" --persistent \
            --socket="$SOCK" "$IMG" >"$TMP/$name.log" 2>&1 &
        SERVER_PID=$!
        PIDS+=("$SERVER_PID")
        ;;
    *) die "unknown server $name" ;;
    esac
    wait_until "$name to serve on $SOCK" 20 nbdinfo --size "$URI"
}

# The pair replicates: both Connected and UpToDate, nothing out of sync.
pair_check() {
    local name=$1 a b
    a=$(pctl alpha status --json)
    b=$(pctl beta status --json)
    [[ $(jq -r '[.role, .disk, .connection, .peer.disk, .out_of_sync_bytes] | join(" ")' <<<"$a") == "Primary UpToDate Connected UpToDate 0" ]] ||
        die "$name: alpha is not a connected, in-sync Primary: $(jq -c '{role, disk, connection, replication, peer, out_of_sync_bytes}' <<<"$a")"
    [[ $(jq -r '[.role, .disk, .connection] | join(" ")' <<<"$b") == "Secondary UpToDate Connected" ]] ||
        die "$name: beta is not a connected, UpToDate Secondary: $(jq -c '{role, disk, connection, replication, out_of_sync_bytes}' <<<"$b")"
}

stop_pair() {
    local name=$1 written
    # Still replicating after the rows, and beta's disk took the writes.
    pair_check "$name"
    written=$(pctl beta status --json | jq -r '.counters.disk_written_bytes')
    ((written > PEER_WRITTEN0)) || die "$name: beta wrote nothing during the rows"
    log "checked: $name stayed Connected/UpToDate; beta wrote $(((written - PEER_WRITTEN0) >> 20)) MiB during the rows"
    pctl alpha down >/dev/null 2>&1 || true
    stop_pid "$SERVER_PID"
    pctl beta down >/dev/null 2>&1 || true
    stop_pid "$PEER_PID"
    SERVER_PID=""
    PEER_PID=""
    # The data areas (everything before the internal metadata) must be
    # identical: a benchmark of a pair that silently stopped replicating
    # would be worthless.
    cmp -n "$DATA" "$IMG" "$IMG2" >/dev/null ||
        die "$name: the data areas of alpha and beta differ (cmp -n $DATA $IMG $IMG2)"
    log "checked: $name data areas identical (cmp of the first $DATA bytes of both backing files)"
}

stop_server() {
    local name=$1
    if [[ $name == repd-pair-* ]]; then
        stop_pair "$name"
        return
    fi
    if [[ $name == repd-* || $name == base-* ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # The clean stop: in-flight requests finish, metadata is written.
        repctl down >/dev/null 2>&1 || true
    fi
    stop_pid "$SERVER_PID"
    SERVER_PID=""
}

# ---- measurements ------------------------------------------------------------

echo "run,server,row,metric,value,unit" >"$CSV"
emit() { echo "$1,$2,$3,$4,$5,$6" >>"$CSV"; }

# fio against the running server; the JSON goes to $RAW/<run>-<server>-<row>.json.
fio_row() {
    local run=$1 server=$2 row=$3
    shift 3
    local json=$RAW/$run-$server-$row.json
    fio --name="$row" --ioengine=nbd --uri="$URI" --size="$DATA" \
        --percentile_list=50:90:99:99.9 --output-format=json --output="$json" "$@" ||
        die "fio failed for $server $row (see $json)"
    echo "$json"
}

# The server's ticks; for a pair, both daemons'.
server_ticks() {
    local t
    t=$(pid_ticks "$SERVER_PID")
    if [[ -n $PEER_PID ]]; then t=$((t + $(pid_ticks "$PEER_PID"))); fi
    echo "$t"
}
# Microseconds of server CPU per op: ticks before, ticks after, ops.
cpu_per_op() {
    awk -v a="$1" -v b="$2" -v n="$3" -v hz="$CLK_TCK" \
        'BEGIN { if (n > 0) printf "%.1f", (b - a) / hz * 1e6 / n; else print 0 }'
}

pct() { # json, path to a percentile object, percentile key; prints microseconds
    jq -r "$2[\"$3\"] / 1000" "$1"
}

# Whether row $1 is selected by ROWS.
want() { [[ " $ROWS " == *" $1 "* ]]; }

measure() {
    local run=$1 s=$2 j t0

    if want flush_qd1; then
        log "[$s] 4 KiB random write + FLUSH, QD1 (fio fsync=1), ${RUNTIME}s"
        j=$(fio_row "$run" "$s" flush_qd1 --rw=randwrite --bs=4k --iodepth=1 --fsync=1 \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
        emit "$run" "$s" flush_qd1 write_p50 "$(pct "$j" '.jobs[0].write.clat_ns.percentile' 50.000000)" us
        emit "$run" "$s" flush_qd1 write_p99 "$(pct "$j" '.jobs[0].write.clat_ns.percentile' 99.000000)" us
        emit "$run" "$s" flush_qd1 flush_p50 "$(pct "$j" '.jobs[0].sync.lat_ns.percentile' 50.000000)" us
        emit "$run" "$s" flush_qd1 flush_p99 "$(pct "$j" '.jobs[0].sync.lat_ns.percentile' 99.000000)" us
        emit "$run" "$s" flush_qd1 iops "$(jq -r '.jobs[0].write.iops' "$j")" write+flush/s
    fi

    if want flush_qd1_libnbd; then
        log "[$s] 4 KiB random write + FLUSH, QD1 (libnbd cross-check), ${XCHECK_RUNTIME}s"
        j=$RAW/$run-$s-flush_qd1_libnbd.json
        t0=$(server_ticks)
        "$NBDLAT" "$URI" flush "$XCHECK_RUNTIME" "$DATA" 4096 "$RAMP" >"$j"
        emit "$run" "$s" flush_qd1_libnbd cpu_per_op "$(cpu_per_op "$t0" "$(server_ticks)" "$(jq -r .all_ops "$j")")" us
        emit "$run" "$s" flush_qd1_libnbd lat_p50 "$(jq -r .lat.p50 "$j")" us
        emit "$run" "$s" flush_qd1_libnbd lat_p99 "$(jq -r .lat.p99 "$j")" us
        emit "$run" "$s" flush_qd1_libnbd write_p50 "$(jq -r .write.p50 "$j")" us
        emit "$run" "$s" flush_qd1_libnbd flush_p50 "$(jq -r .flush.p50 "$j")" us
        emit "$run" "$s" flush_qd1_libnbd flush_p99 "$(jq -r .flush.p99 "$j")" us
        emit "$run" "$s" flush_qd1_libnbd iops "$(jq -r .iops "$j")" write+flush/s
    fi

    if want fua_qd1; then
        log "[$s] 4 KiB FUA write, QD1 (libnbd), ${RUNTIME}s"
        j=$RAW/$run-$s-fua_qd1.json
        t0=$(server_ticks)
        "$NBDLAT" "$URI" fua "$RUNTIME" "$DATA" 4096 "$RAMP" >"$j"
        emit "$run" "$s" fua_qd1 cpu_per_op "$(cpu_per_op "$t0" "$(server_ticks)" "$(jq -r .all_ops "$j")")" us
        emit "$run" "$s" fua_qd1 lat_p50 "$(jq -r .lat.p50 "$j")" us
        emit "$run" "$s" fua_qd1 lat_p99 "$(jq -r .lat.p99 "$j")" us
        emit "$run" "$s" fua_qd1 iops "$(jq -r .iops "$j")" writes/s
    fi

    if want randwrite_qd32; then
        # fio counts the final FLUSH (end_fsync) in the job's runtime, so its IOPS
        # and bandwidth include making the data durable.
        log "[$s] 4 KiB random write, QD32, FLUSH at the end, ${RUNTIME}s"
        t0=$(server_ticks)
        j=$(fio_row "$run" "$s" randwrite_qd32 --rw=randwrite --bs=4k --iodepth=32 \
            --end_fsync=1 --time_based --runtime="$RUNTIME")
        emit "$run" "$s" randwrite_qd32 cpu_per_op "$(cpu_per_op "$t0" "$(server_ticks)" "$(jq -r '.jobs[0].write.total_ios' "$j")")" us
        emit "$run" "$s" randwrite_qd32 iops "$(jq -r '.jobs[0].write.iops' "$j")" writes/s
        emit "$run" "$s" randwrite_qd32 p99 "$(pct "$j" '.jobs[0].write.clat_ns.percentile' 99.000000)" us
    fi

    if want seqwrite_1m; then
        log "[$s] 1 MiB sequential write, QD$SEQ_QD, FLUSH every 64 MiB and at the end, ${RUNTIME}s"
        t0=$(server_ticks)
        j=$(fio_row "$run" "$s" seqwrite_1m --rw=write --bs=1M --iodepth="$SEQ_QD" \
            --fsync=64 --end_fsync=1 --time_based --runtime="$RUNTIME")
        emit "$run" "$s" seqwrite_1m cpu_per_op "$(cpu_per_op "$t0" "$(server_ticks)" "$(jq -r '.jobs[0].write.total_ios' "$j")")" us
        emit "$run" "$s" seqwrite_1m mbps "$(jq -r '.jobs[0].write.bw_bytes / 1000000' "$j")" MB/s
    fi

    if want seqread_1m; then
        # One pass over the extent, so no byte is read twice: after the drop, a
        # buffered server cannot serve this row from memory.
        log "[$s] 1 MiB sequential read, QD$SEQ_QD, one pass, page cache dropped first"
        drop_caches
        t0=$(server_ticks)
        j=$(fio_row "$run" "$s" seqread_1m --rw=read --bs=1M --iodepth="$SEQ_QD" --runtime="$RUNTIME")
        emit "$run" "$s" seqread_1m cpu_per_op "$(cpu_per_op "$t0" "$(server_ticks)" "$(jq -r '.jobs[0].read.total_ios' "$j")")" us
        emit "$run" "$s" seqread_1m mbps "$(jq -r '.jobs[0].read.bw_bytes / 1000000' "$j")" MB/s
    fi
}

# fio's fsync=1 must reach the server as NBD_CMD_FLUSH: compare what fio says
# it issued with the writes and fdatasyncs repd counted.
verify_fio_flush() {
    local j=$TMP/verify.json n=200 before after wbefore wafter
    before=$(repctl status --json | jq -r '.engine.fdatasyncs')
    wbefore=$(repctl status --json | jq -r '.counters.disk_written_bytes')
    fio --name=verify --ioengine=nbd --uri="$URI" --size="$DATA" --rw=randwrite --bs=4k \
        --iodepth=1 --fsync=1 --number_ios=$n --output-format=json --output="$j" >/dev/null
    after=$(repctl status --json | jq -r '.engine.fdatasyncs')
    wafter=$(repctl status --json | jq -r '.counters.disk_written_bytes')
    local writes=$(((wafter - wbefore) / 4096)) syncs=$((after - before))
    local fio_writes fio_syncs
    fio_writes=$(jq -r '.jobs[0].write.total_ios' "$j")
    fio_syncs=$(jq -r '.jobs[0].sync.total_ios' "$j")
    if ((syncs != fio_syncs || writes != fio_writes || syncs < writes - 1)); then
        die "fio fsync=1: fio issued $fio_writes writes and $fio_syncs syncs; repd saw $writes writes and $syncs FLUSHes"
    fi
    log "checked: fio fsync=1 sends NBD FLUSH: fio issued $fio_writes writes + $fio_syncs syncs, repd served $writes writes + $syncs fdatasyncs (fio skips the sync after its last write)"
}

# ---- run ---------------------------------------------------------------------

{
    echo "date: $(date -Is)"
    echo "host: nproc=$(nproc) kernel=$(uname -r) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')\""
    echo "file: $IMG size=$SIZE_BYTES extent=$DATA fs=$FS_TYPE device=$(df --output=source "$IMG" | tail -1)"
    echo "params: SERVERS=\"$SERVERS\" RUNTIME=$RUNTIME RAMP=$RAMP XCHECK_RUNTIME=$XCHECK_RUNTIME SEQ_QD=$SEQ_QD REPEAT=$REPEAT QEMU_AIO=$QEMU_AIO DROP_CACHES=$DROP_CACHES HOGS=$HOGS HOG_NICE=$HOG_NICE RTT_SECONDS=$RTT_SECONDS"
    echo "versions: $("$REPD" --version) | $(nbdkit --version) | $(qemu-nbd --version | head -1) | $(fio --version) | libnbd $(pkg-config --modversion libnbd)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . 2>/dev/null || echo '+dirty') repd: $REPD"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/env-$STAMP.txt" >&2

for ((i = 0; i < HOGS; i++)); do
    nice -n "$HOG_NICE" bash -c 'while :; do :; done' &
    PIDS+=("$!")
done
((HOGS == 0)) || log "started $HOGS busy loop(s) at nice $HOG_NICE"

verified=0
for ((run = 1; run <= REPEAT; run++)); do
    if ((RTT_SECONDS > 0)); then
        j=$RAW/$run-loopback-tcp_rtt.json
        "$TCPRTT" "$RTT_SECONDS" 32 >"$j"
        emit "$run" loopback tcp_rtt p50 "$(jq -r .p50 "$j")" us
        emit "$run" loopback tcp_rtt p99 "$(jq -r .p99 "$j")" us
        log "run $run: loopback TCP round trip (32 bytes) p50 $(jq -r .p50 "$j") us, p99 $(jq -r .p99 "$j") us"
    fi
    for s in $SERVERS; do
        drop_caches
        log "=== run $run: $s (load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
        emit "$run" "$s" load load1 "$(cut -d' ' -f1 /proc/loadavg)" load
        start_server "$s" "$run"
        if [[ $s == repd-* && $s != repd-pair-* && $verified == 0 ]]; then
            verify_fio_flush
            verified=1
        fi
        measure "$run" "$s"
        stop_server "$s"
    done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/env-$STAMP.txt" >&2

python3 "$ROOT/benches/nbd_report.py" "$CSV" | tee "$OUT/report-$STAMP.txt"
log "results: $CSV, raw JSON in $RAW/, report in $OUT/report-$STAMP.txt"
