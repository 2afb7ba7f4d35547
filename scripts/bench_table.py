#!/usr/bin/env python3
"""Turns moe_bench's JSON output (--benchmark_out=run.json --benchmark_out_format=json) into the markdown
tables of docs/benchmarks.md: medians when the run has repetitions, else the single values."""
import json
import sys


def load(path):
    cells = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"]).split("/min_time")[0].split("/iterations")[0].split("/real_time")[0]
        cells[name] = b
    return cells


def fmt(cells, name, counter="GFLOPS", digits=0):
    b = cells.get(name)
    if b is None or counter not in b:
        return "-"
    return f"{b[counter]:.{digits}f}"


def main(path):
    c = load(path)
    print("Machine limits (measured by the bench, best of 7):\n")
    print("| limit | 1 thread | 2 threads |\n|---|---|---|")
    for key, label, counter in [("fma_f32", "f32 FMA, GFLOP/s", "GFLOPS"), ("dot_bf16", "bf16 vdpbf16ps, GFLOP/s", "GFLOPS"),
                                ("dot_int8", "int8 vpdpbusd, GOP/s", "GFLOPS"), ("dram_read", "DRAM read, GB/s", "GBps")]:
        print(f"| {label} | {fmt(c, f'limits/{key}/threads1', counter)} | {fmt(c, f'limits/{key}/threads2', counter)} |")
    print("\nGFLOP/s (roofline_fraction) of the layer forward, and the baselines in f32. On 1 thread, [brackets] give")
    print("GFLOP/s over CPU time instead of wall time: what the cell does when the core is not shared.\n")
    print("| shape | T | thr | f32 | bf16 | int8 | ideal f32 (Eigen) | naive f32 | tokens/s f32 / bf16 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in ["S1", "S2"]:
        for t in [1, 8, 128, 512]:
            for thr in [1, 2]:
                cols = []
                for d in ["f32", "bf16", "int8"]:
                    n = f"forward/{s}/{d}/T{t}/threads{thr}"
                    cpu = ""
                    if thr == 1 and n in c:
                        b = c[n]
                        cpu = f" [{b['GFLOPS'] * b['real_time'] / b['cpu_time']:.0f}]"
                    cols.append(f"{fmt(c, n)} ({fmt(c, n, 'roofline_fraction', 2)}){cpu}")
                ideal = fmt(c, f"ideal/{s}/f32/T{t}/threads{thr}")
                naive = fmt(c, f"naive/{s}/f32/T{t}/threads1", digits=1) if thr == 1 else ""
                tps = " / ".join(fmt(c, f"forward/{s}/{d}/T{t}/threads{thr}", "tokens_per_s") for d in ["f32", "bf16", "int8"])
                print(f"| {s} | {t} | {thr} | {' | '.join(cols)} | {ideal} | {naive} | {tps} |")


if __name__ == "__main__":
    main(sys.argv[1])
