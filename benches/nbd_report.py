#!/usr/bin/env python3
"""Summarise nbd-compare.sh results: a ratio table, per-run spread, JSON.

    nbd_report.py [--markdown] results-<stamp>.csv [more.csv ...]

--markdown prints the tables as Markdown, each value as "mean (run1 / run2
...)". Several CSV files (e.g. two separate runs of the script) are merged; their
runs are numbered in order. Values shown are the mean over runs. Writes
<first csv without .csv>.summary.json next to the first file.

With a replicated pair (repd-pair-*) and nbdkit in the results, it also
prints the issue-3 goals (pair / nbdkit, each marked PASS or FAIL) and the
replicated FLUSH breakdown: the pair's FLUSH p50 next to the single-node
FLUSH p50 of the same mode and the loopback round trip, with what a FLUSH
would cost if the local and the peer's flush ran in parallel (single + RTT)
or in series (2 x single + RTT).
"""

import csv
import json
import statistics
import sys
from collections import defaultdict

SERVERS = ["repd-pair-direct", "repd-pair-buffered", "repd-direct", "repd-buffered",
           "repd-direct-threads", "repd-buffered-threads", "base-direct", "base-buffered",
           "nbdkit", "qemu-nbd"]
REPD = SERVERS[:8]
PAIRS = ["repd-pair-direct", "repd-pair-buffered"]

# Issue 3: (label, row, metric, "le"/"ge", limit) for the ratio pair / nbdkit.
GOALS = [
    ("4K write+FLUSH QD1 pair p50 (libnbd)", "flush_qd1_libnbd", "lat_p50", "le", 1.5),
    ("4K FUA write QD1 p50 (libnbd)", "fua_qd1", "lat_p50", "le", 1.5),
    ("4K randwrite QD32 IOPS", "randwrite_qd32", "iops", "ge", 0.8),
    ("1M seq write, FLUSH/64M, MB/s", "seqwrite_1m", "mbps", "ge", 0.9),
]
OTHERS = ["nbdkit", "qemu-nbd"]

# (row, metric, label) in display order.
SHOWN = [
    ("flush_qd1", "flush_p50", "4K write+FLUSH QD1 (fio): FLUSH p50"),
    ("flush_qd1", "flush_p99", "4K write+FLUSH QD1 (fio): FLUSH p99"),
    ("flush_qd1", "write_p50", "4K write+FLUSH QD1 (fio): write p50"),
    ("flush_qd1", "write_p99", "4K write+FLUSH QD1 (fio): write p99"),
    ("flush_qd1", "iops", "4K write+FLUSH QD1 (fio): pairs/s"),
    ("flush_qd1_libnbd", "lat_p50", "4K write+FLUSH QD1 (libnbd): pair p50"),
    ("flush_qd1_libnbd", "lat_p99", "4K write+FLUSH QD1 (libnbd): pair p99"),
    ("fua_qd1", "lat_p50", "4K FUA write QD1 (libnbd): p50"),
    ("fua_qd1", "lat_p99", "4K FUA write QD1 (libnbd): p99"),
    ("fua_qd1", "iops", "4K FUA write QD1 (libnbd): writes/s"),
    ("randwrite_qd32", "iops", "4K randwrite QD32 + end FLUSH: IOPS"),
    ("seqwrite_1m", "mbps", "1M seq write, FLUSH/64M: MB/s"),
    ("seqread_1m", "mbps", "1M seq read (cold cache): MB/s"),
    ("pair_sync", "mbps", "pair: initial full sync MB/s"),
    # Server CPU (user + system, all its threads) per request.
    ("flush_qd1_libnbd", "cpu_per_op", "server CPU per write+FLUSH pair"),
    ("fua_qd1", "cpu_per_op", "server CPU per FUA write"),
    ("randwrite_qd32", "cpu_per_op", "server CPU per 4K write at QD32"),
    ("seqwrite_1m", "cpu_per_op", "server CPU per 1M write"),
    ("seqread_1m", "cpu_per_op", "server CPU per 1M read"),
]


def lower_is_better(metric):
    return "_p" in metric or metric.startswith("p") or metric.startswith("cpu")


def load(paths):
    values = defaultdict(list)  # (server, row, metric) -> [value per run]
    units = {}
    run_base = 0
    for path in paths:
        top = 0
        with open(path, newline="") as f:
            for rec in csv.DictReader(f):
                run = run_base + int(rec["run"])
                top = max(top, run)
                key = (rec["server"], rec["row"], rec["metric"])
                values[key].append((run, float(rec["value"])))
                units[(rec["row"], rec["metric"])] = rec["unit"]
        run_base = top
    return values, units


def fmt(v):
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def ratio_cell(r, metric):
    if r is None:
        return "-"
    ok = r <= 1.0 if lower_is_better(metric) else r >= 1.0
    return f"{r:.2f}{' ' if ok else '!'}"


def main():
    args = sys.argv[1:]
    markdown = "--markdown" in args
    paths = [a for a in args if a != "--markdown"]
    if not paths:
        sys.exit(__doc__)
    values, units = load(paths)
    servers = [s for s in SERVERS if any(k[0] == s for k in values)]
    mean = {k: statistics.fmean(v for _, v in vs) for k, vs in values.items()}

    def get(server, row, metric):
        return mean.get((server, row, metric))

    pairs = [(a, b) for a in REPD if a in servers for b in OTHERS if b in servers]
    short = {"repd-pair-direct": "pair-dir", "repd-pair-buffered": "pair-buf",
             "repd-direct": "dir", "repd-buffered": "buf", "repd-direct-threads": "dir-thr",
             "repd-buffered-threads": "buf-thr", "base-direct": "base-dir",
             "base-buffered": "base-buf", "nbdkit": "nbdkit", "qemu-nbd": "qemu"}
    head = ["row", "unit", "better"] + servers + [f"{short[a]}/{short[b]}" for a, b in pairs]
    lines = []
    summary = {"rows": []}
    for row, metric, label in SHOWN:
        if not any((s, row, metric) in mean for s in servers):
            continue
        unit = units.get((row, metric), "")
        better = "lower" if lower_is_better(metric) else "higher"
        cells = [label, unit, better]
        for s in servers:
            cell = fmt(get(s, row, metric))
            per_run = [v for _, v in values.get((s, row, metric), [])]
            if markdown and len(per_run) > 1:
                cell += " (" + " / ".join(fmt(v) for v in per_run) + ")"
            cells.append(cell)
        entry = {"row": row, "metric": metric, "unit": unit, "better": better,
                 "mean": {s: get(s, row, metric) for s in servers}, "ratios": {}}
        for a, b in pairs:
            va, vb = get(a, row, metric), get(b, row, metric)
            r = va / vb if va is not None and vb else None
            cells.append(ratio_cell(r, metric))
            entry["ratios"][f"{a}/{b}"] = r
        entry["runs"] = {s: [v for _, v in values.get((s, row, metric), [])] for s in servers}
        summary["rows"].append(entry)
        lines.append(cells)

    if markdown:
        print_markdown(head, lines)
        print_pair(values, mean, servers, summary, markdown=True)
        write_json(paths, summary)
        return

    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]

    def show(cells):
        out = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        print("  ".join(out))

    runs = sorted({run for vs in values.values() for run, _ in vs})
    print(f"Mean over {len(runs)} run(s). Ratio columns are repd / other server:")
    print("  latency rows (better = lower): ratio < 1 means repd is faster;")
    print("  throughput rows (better = higher): ratio > 1 means repd is faster.")
    print("  '!' marks a row where repd is worse than the other server.")
    print("  dir = repd --io direct, buf = repd --io buffered (io_uring engine; -thr: threads engine);")
    print("  pair-dir / pair-buf = replicated repd pair (Primary + Secondary on loopback), same modes.")
    print()
    show(head)
    show(["-" * w for w in widths])
    for cells in lines:
        show(cells)

    if len(runs) > 1:
        print()
        print("Run-to-run spread: (max - min) / mean, per server")
        head2 = ["row"] + servers
        lines2 = []
        for row, metric, label in SHOWN:
            cells = [label]
            for s in servers:
                vs = [v for _, v in values.get((s, row, metric), [])]
                if len(vs) > 1 and statistics.fmean(vs):
                    cells.append(f"{(max(vs) - min(vs)) / statistics.fmean(vs) * 100:.0f}%")
                else:
                    cells.append("-")
            lines2.append(cells)
        widths = [max(len(str(c)) for c in col) for col in zip(head2, *lines2)]
        show(head2)
        show(["-" * w for w in widths])
        for cells in lines2:
            show(cells)

    print_pair(values, mean, servers, summary)
    write_json(paths, summary)


def print_pair(values, mean, servers, summary, markdown=False):
    """Issue-3 goals and the replicated FLUSH breakdown."""
    pairs = [p for p in PAIRS if p in servers]
    if not pairs:
        return
    out = []
    loads = {s: [v for _, v in values.get((s, "load", "load1"), [])] for s in servers}
    if any(loads.values()):
        out.append("Load (1-minute average) when each server started, per run: " + "; ".join(
            f"{s} {' / '.join(f'{v:.1f}' for v in vs)}" for s, vs in loads.items() if vs))
        out.append("")
    goals = []
    if "nbdkit" in servers:
        out.append("Issue 3 goals: replicated pair / nbdkit (same run)")
        head = ["goal", "limit"] + pairs
        rows = []
        for label, row, metric, op, limit in GOALS:
            cells = [label, ("<= " if op == "le" else ">= ") + f"{limit}x"]
            for p in pairs:
                a, b = mean.get((p, row, metric)), mean.get(("nbdkit", row, metric))
                if a is None or not b:
                    cells.append("-")
                    continue
                r = a / b
                ok = r <= limit if op == "le" else r >= limit
                cells.append(f"{r:.2f} {'PASS' if ok else 'FAIL'}")
                goals.append({"goal": label, "server": p, "ratio": r, "limit": limit,
                              "op": op, "pass": ok})
            rows.append(cells)
        out.extend(table(head, rows, markdown))
        out.append("")
    rtt = mean.get(("loopback", "tcp_rtt", "p50"))
    flush = []
    head = ["FLUSH p50 (us)", "pair", "single", "loopback RTT",
            "parallel: single + RTT", "series: 2 x single + RTT"]
    rows = []
    for p in pairs:
        single = p.replace("pair-", "")
        for row, metric, label in [("flush_qd1", "flush_p50", "fio"),
                                   ("flush_qd1_libnbd", "flush_p50", "libnbd")]:
            a, b = mean.get((p, row, metric)), mean.get((single, row, metric))
            if a is None:
                continue
            cells = [f"{p} ({label})", fmt(a), fmt(b)]
            if b is not None and rtt is not None:
                cells += [fmt(rtt), fmt(b + rtt), fmt(2 * b + rtt)]
            else:
                cells += [fmt(rtt), "-", "-"]
            rows.append(cells)
            flush.append({"server": p, "tool": label, "pair_p50": a, "single_p50": b,
                          "rtt_p50": rtt})
    if rows:
        out.append("Replicated FLUSH breakdown (the single-node server of the same mode, same run)")
        out.extend(table(head, rows, markdown))
    print()
    print("\n".join(out))
    summary["issue3_goals"] = goals
    summary["flush_breakdown"] = flush


def table(head, rows, markdown):
    if markdown:
        lines = ["", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
        return lines
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), line(["-" * w for w in widths])] + [line(c) for c in rows]


def print_markdown(head, lines):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|")
    for cells in lines:
        print("| " + " | ".join(str(c).strip() for c in cells) + " |")


def write_json(paths, summary):
    out = paths[0][:-4] if paths[0].endswith(".csv") else paths[0]
    with open(out + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
