#!/usr/bin/env bash
# Compare repd with nbdkit and qemu-nbd on durable single-node NBD work.
#
# One backing file, served in turn (never concurrently) by:
#   repd-direct    repd --engine io-uring --io direct   (O_DIRECT)
#   repd-buffered  repd --engine io-uring --io buffered (page cache)
#   nbdkit         nbdkit file (defaults: cache=default, i.e. page cache)
#   qemu-nbd       qemu-nbd -f raw --cache=none (O_DIRECT) --aio=$QEMU_AIO
# all on a unix socket. Rows, per server:
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
#                      repd-direct-threads, repd-buffered-threads (--engine threads)
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

REPD_DIR=${REPD_DIR:-$ROOT/target/release}
REPD=$REPD_DIR/repd
REPCTL=$REPD_DIR/repctl

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---- processes and cleanup ---------------------------------------------------

PIDS=() # every background process this script started
TMP=""

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

# Stop one process we started: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pid() {
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "process $pid ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
    if [[ -n $TMP && -d $TMP ]]; then rm -rf -- "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Poll a command until it succeeds, or fail after $2 seconds.
wait_until() {
    local what=$1 secs=$2 i
    shift 2
    for ((i = 0; i < secs * 20; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    die "timed out after ${secs}s waiting for $what"
}

# ---- checks and build --------------------------------------------------------

for tool in fio nbdkit qemu-nbd nbdinfo gcc pkg-config jq python3 numfmt; do
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

drop_caches() {
    if [[ $DROP_CACHES == 1 ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

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
address = "127.0.0.1:7788"
disk = "$IMG"
nbd = "unix:$SOCK"
control = "$TMP/alpha.ctl"
EOF
repctl() { "$REPCTL" --config "$CFG" --node alpha "$@"; }

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

start_server() {
    local name=$1
    rm -f "$SOCK"
    case $name in
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

stop_server() {
    local name=$1
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

# CPU time (user + system, all threads, io_uring workers included) the server
# process has used so far, in clock ticks.
CLK_TCK=$(getconf CLK_TCK)
server_ticks() {
    local stat
    read -r stat <"/proc/$SERVER_PID/stat"
    stat=${stat##*) } # fields from 3 (state) on; comm may hold spaces
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
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
    echo "params: RUNTIME=$RUNTIME RAMP=$RAMP XCHECK_RUNTIME=$XCHECK_RUNTIME SEQ_QD=$SEQ_QD REPEAT=$REPEAT QEMU_AIO=$QEMU_AIO DROP_CACHES=$DROP_CACHES HOGS=$HOGS HOG_NICE=$HOG_NICE"
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
    for s in $SERVERS; do
        drop_caches
        log "=== run $run: $s (load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
        start_server "$s"
        if [[ $s == repd-* && $verified == 0 ]]; then
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
