#!/usr/bin/env python3
"""Summarise resync-bench.sh results (issue 5).

    resync_report.py [--markdown] resync-<stamp>.csv [more.csv ...]

Prints three tables: the full (and sparse) initial sync against the raw
copies of the same bytes measured in the same run, the bitmap resync, and
each daemon's CPU time and peak RSS per GiB synced. Values are means over
runs; with several runs each cell also shows the runs' values. Goals
(issue 5) are marked PASS or FAIL: full sync at least 0.9x the faster raw
file copy (dd-direct, dd-buffered); bitmap resync bytes sent / dirty bytes
at most 1.05.
"""

import csv
import statistics
import sys
from collections import defaultdict

GIB = 1 << 30
MIB = 1 << 20


def load(paths):
    values = defaultdict(list)  # (case, size, method, metric) -> [(run, value)]
    run_base = 0
    for path in paths:
        top = 0
        with open(path, newline="") as f:
            for rec in csv.DictReader(f):
                run = run_base + int(rec["run"])
                top = max(top, run)
                key = (rec["case"], rec["size"], rec["method"], rec["metric"])
                values[key].append((run, float(rec["value"])))
        run_base = top
    return values


def fmt(v, digits=None):
    if v is None:
        return "-"
    if digits is not None:
        return f"{v:.{digits}f}"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(head, rows, markdown):
    if markdown:
        print()
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|")
        for cells in rows:
            print("| " + " | ".join(str(c) for c in cells) + " |")
        return
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths))))
    line(head)
    line(["-" * w for w in widths])
    for cells in rows:
        line(cells)


def main():
    args = sys.argv[1:]
    markdown = "--markdown" in args
    paths = [a for a in args if a != "--markdown"]
    if not paths:
        sys.exit(__doc__)
    values = load(paths)
    runs = sorted({r for vs in values.values() for r, _ in vs})

    def get(case, size, method, metric):
        vs = values.get((case, size, method, metric))
        return statistics.fmean(v for _, v in vs) if vs else None

    def cell(case, size, method, metric, digits=None, scale=1.0):
        vs = values.get((case, size, method, metric))
        if not vs:
            return "-"
        out = fmt(statistics.fmean(v for _, v in vs) / scale, digits)
        if len(vs) > 1:
            out += " (" + " / ".join(fmt(v / scale, digits) for _, v in vs) + ")"
        return out

    def per_run(case, size, method, metric):
        return dict(values.get((case, size, method, metric), []))

    def speed_cell(case, size, methods, repd_method="repd"):
        """raw seconds / repd seconds, run by run (the fastest of `methods`
        in each run); the mean of the per-run ratios, then each run's."""
        repd = per_run(case, size, repd_method, "seconds")
        raws = [per_run(case, size, m, "seconds") for m in methods]
        ratios = []
        for run, secs in sorted(repd.items()):
            got = [r[run] for r in raws if run in r]
            if got and secs:
                ratios.append(min(got) / secs)
        if not ratios:
            return None, "-"
        mean = statistics.fmean(ratios)
        out = f"{mean:.2f}"
        if len(ratios) > 1:
            out += " (" + " / ".join(f"{r:.2f}" for r in ratios) + ")"
        return mean, out

    sizes = []
    for (case, size, _, _) in values:
        if size not in sizes:
            sizes.append(size)
    print(f"Mean over {len(runs)} run(s); ratios are computed run by run, then averaged.")

    # Full / sparse initial sync.
    for case in ["full", "sparse"]:
        rows = []
        for size in sizes:
            repd = get(case, size, "repd", "seconds")
            if repd is None:
                continue
            data = get(case, size, "repd", "data_bytes")
            load1 = get(case, size, "all", "load1")
            for method in ["dd-direct", "dd-buffered", "nbdcopy", "repd"]:
                secs = get(case, size, method, "seconds")
                if secs is None:
                    continue
                ratio = speed_cell(case, size, [method])[1] if method != "repd" else "-"
                rows.append([f"{size} {method}", cell(case, size, method, "seconds"),
                             cell(case, size, method, "mbps"), ratio,
                             fmt(load1, 1) if method == "dd-direct" else ""])
            r, text = speed_cell(case, size, ["dd-direct", "dd-buffered"])
            if r is not None and case == "full":
                rows.append([f"{size} goal: repd >= 0.9x the faster raw file copy", "", "",
                             f"{text} {'PASS' if r >= 0.9 else 'FAIL'}", ""])
            if data:
                rows.append([f"{size} (data area {data / MIB:,.0f} MiB)", "", "", "", ""])
        if rows:
            print()
            what = ("Full initial sync (incompressible data)" if case == "full"
                    else "Full initial sync of a never-written (sparse) device")
            print(f"{what}: seconds, MB/s of the data area, and speed relative to the raw copy"
                  " (raw seconds / repd seconds; >= 1 means repd is as fast)")
            table(["size / method", "seconds", "MB/s", "repd speed / method", "load"], rows,
                  markdown)

    # Bitmap resync.
    rows = []
    for size in sizes:
        repd = get("bitmap", size, "repd", "seconds")
        if repd is None:
            continue
        ratio = get("bitmap", size, "repd", "sent_per_dirty")
        dd = get("bitmap", size, "dd-direct", "seconds")
        rnd = get("bitmap", size, "fio-4k-random", "seconds")
        rows.append([size,
                     cell("bitmap", size, "repd", "dirty_bytes", scale=MIB),
                     cell("bitmap", size, "repd", "resync_sent_bytes", scale=MIB),
                     ("-" if ratio is None else
                      f"{ratio:.3f} {'PASS' if ratio <= 1.05 else 'FAIL'}"),
                     cell("bitmap", size, "repd", "seconds"),
                     cell("bitmap", size, "repd", "mbps"),
                     cell("bitmap", size, "dd-direct", "seconds"),
                     "-" if dd is None else speed_cell("bitmap", size, ["dd-direct"])[1],
                     cell("bitmap", size, "fio-4k-random", "seconds"),
                     "-" if rnd is None else speed_cell("bitmap", size, ["fio-4k-random"])[1],
                     fmt(get("bitmap", size, "all", "load1"), 1)])
    if rows:
        print()
        print("Bitmap resync: sent / dirty (goal <= 1.05); time against the raw I/O of the same bytes"
              " (raw seconds / repd seconds)")
        table(["size", "dirty MiB", "sent MiB", "sent/dirty", "repd s", "repd MB/s",
               "dd-direct seq s", "vs dd", "fio 4K random s", "vs fio", "load"], rows, markdown)

    # Daemon costs.
    rows = []
    for case in ["full", "sparse", "bitmap"]:
        for size in sizes:
            if get(case, size, "repd", "seconds") is None:
                continue
            for node in ["alpha", "beta"]:
                rows.append([f"{case} {size}", node,
                             cell(case, size, "repd", f"cpu_{node}"),
                             cell(case, size, "repd", f"cpu_per_gib_{node}"),
                             cell(case, size, "repd", f"hwm_{node}", scale=1024)])
    if rows:
        print()
        print("Daemon costs during the sync: CPU seconds (utime + stime), per GiB synced"
              " (bitmap: per dirty GiB), and peak RSS (VmHWM)")
        table(["case", "node", "CPU s", "CPU s / GiB", "VmHWM MiB"], rows, markdown)


if __name__ == "__main__":
    main()
