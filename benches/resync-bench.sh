#!/usr/bin/env bash
# Whole-system resync benchmark (issue 5): two repd nodes on loopback, each
# measured side by side with raw copies of the same bytes in the same run.
#
# Cases (CASES), per device size in SIZES, REPEAT times:
#   full     full initial sync. alpha's backing file is filled with
#            incompressible, non-zero data (/dev/urandom), so no zero-range
#            shortcut can make the copy cheap; beta's is a fresh sparse file.
#            Timed: `repctl primary --force` on alpha (which starts the sync
#            to beta; both daemons already running and Connected) until
#            `repctl wait-sync` returns. Raw limits of the same bytes (the
#            data area, `size_bytes`), each to a fresh file on the same disk,
#            page cache dropped before each:
#              dd-direct    dd bs=1M iflag=direct oflag=direct conv=fsync
#              dd-buffered  dd bs=1M conv=fsync (page cache, like cp + sync)
#              nbdcopy      nbdcopy --flush between two `nbdkit file`
#                           servers (unix sockets; nbdcopy's defaults)
#            Goal: repd at least 0.9x the faster of dd-direct and dd-buffered.
#   sparse   the same with alpha's data area never written (a sparse file):
#            what a full sync of an empty device costs (dd-direct and repd
#            only).
#   bitmap   bitmap resync, on the pair the `full` case just synced, for the
#            size BITMAP_SIZE: beta goes away (`repctl disconnect` on beta,
#            or `repctl down` with BITMAP_AWAY=down), DIRTY_PCT % of the
#            blocks are rewritten at random through NBD on alpha (fio, 4 KiB,
#            QD$WRITE_QD, every block at most once), then beta comes back
#            (`repctl connect`, or a new repd) and the time until
#            `wait-sync` returns is measured. Checked: resync bytes sent
#            (counters.resync_sent_bytes, delta) / dirty bytes
#            (out_of_sync_bytes just before) <= 1.05. Raw references: dd
#            (direct) of the same number of bytes sequentially, and fio
#            reading the same number of random 4 KiB blocks from alpha's file
#            while writing as many to a copy (QD32 each, O_DIRECT).
# For every repd sync: CPU seconds (utime + stime, /proc/PID/stat) of each
# daemon during the sync, per GiB synced, and its peak RSS (VmHWM,
# /proc/PID/status; reset with clear_refs before the sync when possible).
# After every repd case both daemons are stopped and the data areas compared
# with cmp; a difference fails the run.
#
# Results: a table on stdout; CSV (results-<stamp>.csv), env and report in
# $OUT (bench-out/, gitignored), raw fio JSON and daemon logs in
# $OUT/raw-resync-<stamp>/. Run as root (it drops the page cache and resets
# VmHWM). See docs/benchmarks.md, "Resync (issue 5)".
#
# Environment (defaults in brackets):
#   SIZES ["1G 4G"]     device (backing file) sizes, numfmt --from=iec syntax
#   CASES ["full bitmap"]  any of: full sparse bitmap (bitmap needs full)
#   BITMAP_SIZE [last of SIZES]  the size the bitmap case runs on
#   DIRTY_PCT [10]      percentage of the blocks rewritten for the bitmap case
#   WRITE_QD [32]       fio queue depth of those writes
#   BITMAP_AWAY [disconnect]  how beta goes away: disconnect or down
#   REPEAT [1]          repeat everything this many times
#   IO [direct]         repd --io direct|buffered (both nodes)
#   SYNC_RATE []        if set, [sync] rate = "$SYNC_RATE" in the config
#   SYNC_TIMEOUT [1800s]  wait-sync timeout
#   WORKDIR [/work]     where the temporary directory and files go
#   OUT [<repo>/bench-out]
#   DROP_CACHES [1]     drop the page cache before each copy and sync
#   BUILD [1]           cargo build --release first (0: use the binaries as they are)
#   REPD_DIR [<repo>/target/release]  where repd and repctl are
# Needs: fio nbdkit libnbd-bin (nbdcopy, nbdinfo) jq python3 cmp dd.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZES=${SIZES:-"1G 4G"}
CASES=${CASES:-"full bitmap"}
BITMAP_SIZE=${BITMAP_SIZE:-${SIZES##* }}
DIRTY_PCT=${DIRTY_PCT:-10}
WRITE_QD=${WRITE_QD:-32}
BITMAP_AWAY=${BITMAP_AWAY:-disconnect}
REPEAT=${REPEAT:-1}
IO=${IO:-direct}
SYNC_RATE=${SYNC_RATE:-}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-1800s}
WORKDIR=${WORKDIR:-/work}
OUT=${OUT:-$ROOT/bench-out}
DROP_CACHES=${DROP_CACHES:-1}
BUILD=${BUILD:-1}
REPD_DIR=${REPD_DIR:-$ROOT/target/release}
REPD=$REPD_DIR/repd
REPCTL=$REPD_DIR/repctl

# log, die, stop_pid, cleanup, wait_until, drop_caches, pid_ticks, free_port
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---- checks and build --------------------------------------------------------

for tool in fio nbdkit nbdcopy nbdinfo jq python3 numfmt cmp dd; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install -y fio nbdkit libnbd-bin jq python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
nbdkit --filter=truncate file --help >/dev/null 2>&1 || die "needs nbdkit's truncate filter (nbdkit package)"
case $IO in direct | buffered) ;; *) die "IO must be direct or buffered" ;; esac
case $BITMAP_AWAY in disconnect | down) ;; *) die "BITMAP_AWAY must be disconnect or down" ;; esac
for c in $CASES; do
    case $c in full | sparse | bitmap) ;; *) die "unknown case $c (full, sparse, bitmap)" ;; esac
done
if [[ " $CASES " == *" bitmap "* && " $CASES " != *" full "* ]]; then
    die "the bitmap case runs on the pair the full case synced: add full to CASES"
fi
if [[ $DROP_CACHES == 1 && ! -w /proc/sys/vm/drop_caches ]]; then
    die "cannot write /proc/sys/vm/drop_caches (run as root, or DROP_CACHES=0 and say so in the results)"
fi

mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$OUT/resync-$STAMP.csv
RAW=$OUT/raw-resync-$STAMP
mkdir -p "$RAW"
TMP=$(mktemp -d "$WORKDIR/tandem-resync.XXXXXX")

if [[ $BUILD == 1 ]]; then
    log "building repd and repctl (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin repd --bin repctl)
fi
[[ -x $REPD && -x $REPCTL ]] || die "no repd and repctl in $REPD_DIR"

# Disk space: alpha, beta and one copy of the largest size at once.
need=0
for s in $SIZES; do
    b=$(numfmt --from=iec "$s")
    ((b > need)) && need=$b
done
avail=$(($(df --output=avail -B1 "$TMP" | tail -1)))
((avail > 3 * need + 2 * (1 << 30))) || die "needs about $(((3 * need) >> 30)) GiB free in $WORKDIR (has $((avail >> 30)) GiB)"


# Peak resident set size so far, in KiB.
pid_hwm() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
# Reset the peak RSS to the current RSS (Linux clear_refs 5), if allowed.
CAN_RESET_HWM=0
reset_hwm() {
    if [[ -w /proc/$1/clear_refs ]] && echo 5 >"/proc/$1/clear_refs" 2>/dev/null; then
        CAN_RESET_HWM=1
    fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }


echo "run,case,size,method,metric,value,unit" >"$CSV"
emit() { echo "$1,$2,$3,$4,$5,$6,$7" >>"$CSV"; }

A=$TMP/alpha.img
B=$TMP/beta.img
C=$TMP/copy.img
CFG=$TMP/pair.toml
A_PID=""
B_PID=""

write_config() {
    local rate=""
    [[ -z $SYNC_RATE ]] || rate=$'\n[sync]\nrate = "'"$SYNC_RATE"$'"\n'
    cat >"$CFG" <<EOF
[resource]
name = "r0"
fencing = "dont-care"
$rate
[[node]]
name = "alpha"
address = "127.0.0.1:$(free_port)"
disk = "$A"
nbd = "unix:$TMP/alpha.nbd"
control = "$TMP/alpha.ctl"

[[node]]
name = "beta"
address = "127.0.0.1:$(free_port)"
disk = "$B"
nbd = "unix:$TMP/beta.nbd"
control = "$TMP/beta.ctl"
EOF
}
pctl() { "$REPCTL" --config "$CFG" --node "$@"; }

start_node() { # node; sets A_PID or B_PID
    local n=$1 pid
    "$REPD" --config "$CFG" --node "$n" --io "$IO" >>"$RAW/$n.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if [[ $n == alpha ]]; then A_PID=$pid; else B_PID=$pid; fi
    wait_until "repd $n to answer" 20 pctl "$n" status --json
}

stop_node() {
    local n=$1 pid
    if [[ $n == alpha ]]; then pid=$A_PID; else pid=$B_PID; fi
    [[ -n $pid ]] || return 0
    pctl "$n" down >/dev/null 2>&1 || true
    stop_pid "$pid"
    if [[ $n == alpha ]]; then A_PID=""; else B_PID=""; fi
}

# Both stopped: the data areas must be identical.
verify_identical() {
    local what=$1 data=$2
    cmp -n "$data" "$A" "$B" >/dev/null ||
        die "$what: the data areas of alpha and beta differ (cmp -n $data $A $B)"
    log "checked: $what: data areas identical (cmp of the first $data bytes)"
}

in_sync() {
    [[ $(pctl alpha status --json | jq -r '[.disk, .connection, .peer.disk, .out_of_sync_bytes] | join(" ")') == "UpToDate Connected UpToDate 0" ]]
}

# CPU and peak RSS of both daemons for one sync of $bytes.
emit_daemon_costs() { # run case size bytes ticks_a0 ticks_b0
    local run=$1 case=$2 size=$3 bytes=$4 ta0=$5 tb0=$6 n pid t0 secs
    for n in alpha beta; do
        if [[ $n == alpha ]]; then pid=$A_PID t0=$ta0; else pid=$B_PID t0=$tb0; fi
        secs=$(awk -v a="$t0" -v b="$(pid_ticks "$pid")" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
        emit "$run" "$case" "$size" repd "cpu_$n" "$secs" s
        emit "$run" "$case" "$size" repd "cpu_per_gib_$n" "$(awk -v s="$secs" -v b="$bytes" 'BEGIN { printf "%.3f", s / (b / 1073741824) }')" s/GiB
        emit "$run" "$case" "$size" repd "hwm_$n" "$(pid_hwm "$pid")" KiB
    done
}

# ---- raw copies ----------------------------------------------------------------

copy_raw() { # run case size method bytes
    local run=$1 case=$2 size=$3 method=$4 bytes=$5 t0 t1 s1 s2 p1="" p2=""
    rm -f "$C"
    drop_caches
    t0=$(now)
    case $method in
    dd-direct)
        dd if="$A" of="$C" bs=1M count="$bytes" iflag=direct,count_bytes oflag=direct conv=fsync status=none
        ;;
    dd-buffered)
        dd if="$A" of="$C" bs=1M count="$bytes" iflag=count_bytes conv=fsync status=none
        ;;
    nbdcopy)
        truncate -s "$bytes" "$C"
        s1=$TMP/src.nbd s2=$TMP/dst.nbd
        rm -f "$s1" "$s2"
        nbdkit --foreground --exit-with-parent --unix "$s1" --filter=truncate file file="$A" truncate="$bytes" \
            >>"$RAW/nbdkit.log" 2>&1 &
        p1=$!
        PIDS+=("$p1")
        nbdkit --foreground --exit-with-parent --unix "$s2" file file="$C" >>"$RAW/nbdkit.log" 2>&1 &
        p2=$!
        PIDS+=("$p2")
        wait_until "nbdkit (source)" 20 nbdinfo --size "nbd+unix:///?socket=$s1"
        wait_until "nbdkit (destination)" 20 nbdinfo --size "nbd+unix:///?socket=$s2"
        t0=$(now)
        nbdcopy --flush "nbd+unix:///?socket=$s1" "nbd+unix:///?socket=$s2"
        ;;
    *) die "unknown copy method $method" ;;
    esac
    t1=$(now)
    [[ $method != nbdcopy ]] || {
        stop_pid "$p1"
        stop_pid "$p2"
    }
    local secs
    secs=$(elapsed "$t0" "$t1")
    emit "$run" "$case" "$size" "$method" seconds "$secs" s
    emit "$run" "$case" "$size" "$method" mbps "$(awk -v s="$secs" -v b="$bytes" 'BEGIN { printf "%.1f", b / s / 1e6 }')" MB/s
    log "[$case $size] $method: $bytes bytes in $secs s"
    rm -f "$C"
}

# ---- the full (or sparse) initial sync -------------------------------------------

DATA=0 # the data area of the current pair, in bytes

case_full() { # run case size
    local run=$1 case=$2 size=$3 bytes
    bytes=$(numfmt --from=iec "$size")
    stop_node alpha
    stop_node beta
    rm -f "$A" "$B"
    if [[ $case == full ]]; then
        log "[$case $size] filling alpha's file with $bytes bytes from /dev/urandom"
        head -c "$bytes" /dev/urandom | dd of="$A" bs=1M iflag=fullblock oflag=direct status=none
    else
        truncate -s "$bytes" "$A"
    fi
    truncate -s "$bytes" "$B"
    write_config
    pctl alpha create-md --force >/dev/null
    pctl beta create-md --force >/dev/null
    DATA=$(pctl alpha dump-md | jq -r .size_bytes)

    emit "$run" "$case" "$size" all load1 "$(cut -d' ' -f1 /proc/loadavg)" load
    local methods="dd-direct dd-buffered nbdcopy"
    [[ $case == full ]] || methods="dd-direct"
    for m in $methods; do copy_raw "$run" "$case" "$size" "$m" "$DATA"; done

    drop_caches
    start_node alpha
    start_node beta
    pctl alpha wait-connect --timeout 30s >/dev/null
    local ta0 tb0 t0 t1 secs
    reset_hwm "$A_PID"
    reset_hwm "$B_PID"
    ta0=$(pid_ticks "$A_PID")
    tb0=$(pid_ticks "$B_PID")
    t0=$(now)
    pctl alpha primary --force >/dev/null 2>&1
    pctl alpha wait-sync --timeout "$SYNC_TIMEOUT" >/dev/null || die "[$case $size] the sync did not finish"
    t1=$(now)
    secs=$(elapsed "$t0" "$t1")
    in_sync || die "[$case $size] wait-sync returned but the pair is not in sync: $(pctl alpha status --json | jq -c .)"
    local sent
    sent=$(pctl alpha status --json | jq -r .counters.resync_sent_bytes)
    emit "$run" "$case" "$size" repd seconds "$secs" s
    emit "$run" "$case" "$size" repd mbps "$(awk -v s="$secs" -v b="$DATA" 'BEGIN { printf "%.1f", b / s / 1e6 }')" MB/s
    emit "$run" "$case" "$size" repd resync_sent_bytes "$sent" B
    emit "$run" "$case" "$size" repd data_bytes "$DATA" B
    emit_daemon_costs "$run" "$case" "$size" "$DATA" "$ta0" "$tb0"
    log "[$case $size] repd full sync: $DATA bytes in $secs s (resync_sent_bytes $sent)"
    stop_node alpha
    stop_node beta
    verify_identical "[$case $size] full sync" "$DATA"
}

# ---- the bitmap resync -----------------------------------------------------------

case_bitmap() { # run size; on the pair case_full left (both stopped, identical)
    local run=$1 size=$2 case=bitmap
    start_node alpha
    start_node beta
    pctl alpha wait-connect --timeout 30s >/dev/null
    pctl alpha primary >/dev/null
    wait_until "the pair to be in sync" 60 in_sync

    # beta goes away
    if [[ $BITMAP_AWAY == down ]]; then
        stop_node beta
    else
        pctl beta disconnect >/dev/null
    fi
    wait_until "alpha to see beta gone" 30 \
        bash -c "[[ \$('$REPCTL' --config '$CFG' --node alpha status --json | jq -r .connection) != Connected ]]"

    # DIRTY_PCT % of the blocks rewritten at random, each at most once (fio's
    # random map), through NBD on alpha.
    local blocks n j
    blocks=$((DATA / 4096))
    n=$((blocks * DIRTY_PCT / 100))
    j=$RAW/$run-bitmap-$size-dirty.json
    log "[$case $size] beta away ($BITMAP_AWAY); rewriting $n of $blocks blocks at random through alpha"
    fio --name=dirty --ioengine=nbd --uri="nbd+unix:///?socket=$TMP/alpha.nbd" --size="$DATA" \
        --rw=randwrite --bs=4k --iodepth="$WRITE_QD" --number_ios="$n" --randseed=4242 \
        --end_fsync=1 --output-format=json --output="$j" >/dev/null ||
        die "fio failed (see $j)"
    local st dirty sent0
    st=$(pctl alpha status --json)
    dirty=$(jq -r .out_of_sync_bytes <<<"$st")
    sent0=$(jq -r .counters.resync_sent_bytes <<<"$st")
    ((dirty > 0)) || die "[$case $size] nothing is out of sync after the writes: $(jq -c . <<<"$st")"
    emit "$run" "$case" "$size" repd dirty_bytes "$dirty" B
    emit "$run" "$case" "$size" repd written_blocks "$n" blocks
    emit "$run" "$case" "$size" all load1 "$(cut -d' ' -f1 /proc/loadavg)" load

    # Raw references for the same number of bytes.
    copy_raw "$run" "$case" "$size" dd-direct "$dirty"
    rm -f "$C"
    truncate -s "$DATA" "$C"
    drop_caches
    j=$RAW/$run-bitmap-$size-raw4k.json
    local t0 t1 secs
    t0=$(now)
    fio --output-format=json --output="$j" --ioengine=io_uring --direct=1 --bs=4k \
        --iodepth=32 --size="$DATA" --randseed=4242 --number_ios="$((dirty / 4096))" \
        --name=read --filename="$A" --rw=randread \
        --name=write --filename="$C" --rw=randwrite --end_fsync=1 >/dev/null ||
        die "fio failed (see $j)"
    t1=$(now)
    secs=$(elapsed "$t0" "$t1")
    emit "$run" "$case" "$size" fio-4k-random seconds "$secs" s
    emit "$run" "$case" "$size" fio-4k-random mbps "$(awk -v s="$secs" -v b="$dirty" 'BEGIN { printf "%.1f", b / s / 1e6 }')" MB/s
    log "[$case $size] fio-4k-random: $((dirty / 4096)) random 4 KiB reads + as many writes (O_DIRECT, QD32 each) in $secs s"
    rm -f "$C"

    # beta comes back: the resync
    drop_caches
    local ta0 tb0
    if [[ $BITMAP_AWAY == down ]]; then
        reset_hwm "$A_PID"
        ta0=$(pid_ticks "$A_PID")
        t0=$(now)
        start_node beta
        tb0=0 # beta's whole life is this resync
    else
        reset_hwm "$A_PID"
        reset_hwm "$B_PID"
        ta0=$(pid_ticks "$A_PID")
        tb0=$(pid_ticks "$B_PID")
        t0=$(now)
        pctl beta connect >/dev/null
    fi
    pctl alpha wait-sync --timeout "$SYNC_TIMEOUT" >/dev/null || die "[$case $size] the resync did not finish"
    t1=$(now)
    secs=$(elapsed "$t0" "$t1")
    in_sync || die "[$case $size] wait-sync returned but the pair is not in sync"
    local sent
    sent=$(($(pctl alpha status --json | jq -r .counters.resync_sent_bytes) - sent0))
    emit "$run" "$case" "$size" repd seconds "$secs" s
    emit "$run" "$case" "$size" repd mbps "$(awk -v s="$secs" -v b="$dirty" 'BEGIN { printf "%.1f", b / s / 1e6 }')" MB/s
    emit "$run" "$case" "$size" repd resync_sent_bytes "$sent" B
    emit "$run" "$case" "$size" repd sent_per_dirty "$(awk -v s="$sent" -v d="$dirty" 'BEGIN { printf "%.4f", s / d }')" ratio
    emit "$run" "$case" "$size" repd data_bytes "$DATA" B
    emit_daemon_costs "$run" "$case" "$size" "$dirty" "$ta0" "$tb0"
    log "[$case $size] repd bitmap resync: $dirty dirty bytes, $sent sent, in $secs s"
    stop_node alpha
    stop_node beta
    verify_identical "[$case $size] bitmap resync" "$DATA"
}

# ---- run -------------------------------------------------------------------------

{
    echo "date: $(date -Is)"
    echo "host: nproc=$(nproc) kernel=$(uname -r) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')\""
    echo "dir: $TMP fs=$(findmnt -no FSTYPE -T "$TMP" 2>/dev/null || stat -f -c %T "$TMP") device=$(df --output=source "$TMP" | tail -1)"
    echo "params: SIZES=\"$SIZES\" CASES=\"$CASES\" BITMAP_SIZE=$BITMAP_SIZE DIRTY_PCT=$DIRTY_PCT WRITE_QD=$WRITE_QD BITMAP_AWAY=$BITMAP_AWAY REPEAT=$REPEAT IO=$IO SYNC_RATE=${SYNC_RATE:-none} DROP_CACHES=$DROP_CACHES"
    echo "versions: $("$REPD" --version) | $(nbdkit --version) | $(nbdcopy --version | head -1) | $(fio --version)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . 2>/dev/null || echo '+dirty') repd: $REPD"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/resync-env-$STAMP.txt" >&2

for ((run = 1; run <= REPEAT; run++)); do
    for size in $SIZES; do
        for case in full sparse; do
            [[ " $CASES " == *" $case "* ]] || continue
            log "=== run $run: $case $size (load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
            case_full "$run" "$case" "$size"
            if [[ $case == full && " $CASES " == *" bitmap "* && $size == "$BITMAP_SIZE" ]]; then
                log "=== run $run: bitmap $size (load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
                case_bitmap "$run" "$size"
            fi
        done
    done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/resync-env-$STAMP.txt" >&2
[[ $CAN_RESET_HWM == 1 ]] || log "note: VmHWM could not be reset (no write access to /proc/PID/clear_refs): peaks include the daemons' start"

python3 "$ROOT/benches/resync_report.py" "$CSV" | tee "$OUT/resync-report-$STAMP.txt"
log "results: $CSV, raw data in $RAW/, report in $OUT/resync-report-$STAMP.txt"
