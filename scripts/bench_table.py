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
    print("\nGFLOP/s (roofline_fraction) of the layer forward, and the baselines in f32:\n")
    dtypes = ["f32", "bf16", "int8", "int4"]
    names = " / ".join(dtypes)
    print(f"| shape | T | thr | {' | '.join(dtypes)} | ideal f32 (Eigen) | naive f32 | tokens/s {names} | weights GB/s {names} |")
    print("|---" * (len(dtypes) + 7) + "|")
    for s in ["S1", "S2"]:
        for t in [1, 8, 128, 512]:
            for thr in [1, 2]:
                cell = lambda d: f"forward/{s}/{d}/T{t}/threads{thr}"
                cols = [f"{fmt(c, cell(d))} ({fmt(c, cell(d), 'roofline_fraction', 2)})" for d in dtypes]
                ideal = fmt(c, f"ideal/{s}/f32/T{t}/threads{thr}")
                naive = fmt(c, f"naive/{s}/f32/T{t}/threads1", digits=1) if thr == 1 else ""
                tps = " / ".join(fmt(c, cell(d), "tokens_per_s") for d in dtypes)
                gbs = " / ".join(fmt(c, cell(d), "weights_GBps") for d in dtypes)
                print(f"| {s} | {t} | {thr} | {' | '.join(cols)} | {ideal} | {naive} | {tps} | {gbs} |")
    print("\n2-thread scaling (GFLOP/s on 2 threads / on 1 thread):\n")
    print(f"| shape | T | {' | '.join(dtypes)} |\n" + "|---" * (len(dtypes) + 2) + "|")
    for s in ["S1", "S2"]:
        for t in [128, 512]:
            ratios = []
            for d in dtypes:
                one, two = c.get(f"forward/{s}/{d}/T{t}/threads1"), c.get(f"forward/{s}/{d}/T{t}/threads2")
                ratios.append(f"{two['GFLOPS'] / one['GFLOPS']:.2f}x" if one and two else "-")
            print(f"| {s} | {t} | {' | '.join(ratios)} |")
    print("\nTraining step in f32: re-pack (as after an optimizer update), forward, backward; GFLOPS counts 3x the forward's active FLOPs:\n")
    print("| shape | T | thr | ms / step | GFLOP/s | tokens/s |\n|---|---|---|---|---|---|")
    for s in ["S1", "S2"]:
        for t in [1, 8, 128, 512]:
            for thr in [1, 2]:
                n = f"forward_backward/{s}/f32/T{t}/threads{thr}"
                if n in c:
                    print(f"| {s} | {t} | {thr} | {fmt(c, n, 'real_time', 1)} | {fmt(c, n)} | {fmt(c, n, 'tokens_per_s')} |")


if __name__ == "__main__":
    main(sys.argv[1])
