# shellcheck shell=bash
# Shell helpers shared by the whole-system benchmark scripts
# (nbd-compare.sh, resync-bench.sh): logging, the processes a script
# started and their cleanup on exit, polling, page-cache dropping, CPU
# ticks of a process, and a free loopback port. Sourced, not run; the
# caller sets ROOT and DROP_CACHES before sourcing.

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

drop_caches() {
    if [[ $DROP_CACHES == 1 ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# A TCP port on 127.0.0.1 that is free now (the kernel picks it), so runs
# of this script and other people's tests do not collide.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# CPU time (user + system, all threads, io_uring workers included) a
# process has used so far, in clock ticks (CLK_TCK per second).
# shellcheck disable=SC2034 # used by the scripts that source this file
CLK_TCK=$(getconf CLK_TCK)
pid_ticks() {
    local stat
    read -r stat <"/proc/$1/stat"
    stat=${stat##*) } # fields from 3 (state) on; comm may hold spaces
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
