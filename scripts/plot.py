#!/usr/bin/python3
"""Turns the CSV files the examples write into PNG plots next to them.

Usage: scripts/plot.py DIR     (run with Debian's /usr/bin/python3, which has python3-matplotlib)

Known files:
  *_loss.csv         columns model,step,loss          -> *_loss.png (loss curves, log scale)
  *_expert_load.csv  RoutingStats::write_csv output   -> *_expert_load.png (share of each group's tokens
  (or *_expert_load_<arm>.csv)                           per expert, as a heatmap)
  *_specialization.csv  model,step,normalized_mi,max_violation
                                                      -> *_specialization.png (MI(domain; expert) / H(domain)
                                                         and MaxVio over training, one line per model)
  *_max_violation.csv   model,step,max_violation      -> *_max_violation.png (MaxVio per step, moving average
                                                         over 25 steps, one line per model)
  *_experts_per_token.csv  model,step,all,easy,hard   -> *_experts_per_token.png (true experts per token over
                                                         training: all solid, easy dashed, hard dotted)
  *_drops.csv        capacity_factor,z_coeff,drop_fraction -> *_drops.png (dropped share vs capacity factor,
                                                         one bar per z-loss coefficient)
  *_logits.csv       model,step,lse2,max_abs_z        -> *_logits.png (mean logsumexp(z)^2 and max |z| of the
                                                         router over training)
  *_shares.csv       arm,tau,layer,zero,copy,constant,ffn_per_token,...  -> *_shares.png (MoE++: share of
                                                         zero-computation slots and FFN experts per token vs tau)
  *_throughput.csv   tau,layer,...,gain,predicted_gain -> *_throughput.png (measured vs predicted speed-up bars)
  *_hit_rate.csv     predictor,P,layer,hit_rate,random -> *_hit_rate.png (prefetch hit-rate bars per predictor
                                                         and P, with the random P/E baseline)
  *_routing.csv      columns model,step,<share>...    -> *_routing.png (each routing share against step,
                                                         per model, as a moving average over 25 steps)
  *_domain_eval.csv  columns model,domain,loss,...    -> *_domain_eval.png (held-out loss per domain and
                                                         model, grouped bars, log scale)
  *_active.csv       columns step,active_experts,tau  -> *_active.png (mean active experts per token over
                                                         training, temperature on a second axis)
  *_error.csv        columns n,setting,replicate,     -> *_error.png (geometric mean error over replicates
                     density_error,parameter_error       against n, log-log, with least-squares slopes)
"""
import csv
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def moving_average(values: list, window: int) -> list:
    """Mean of the last `window` values at each point (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def bar_positions(n_groups: int, n_series: int, series: int) -> tuple:
    """x positions of series `series` of `n_series` bars side by side in each of `n_groups` groups, and the width."""
    width = 0.8 / n_series
    return [g + (series - (n_series - 1) / 2) * width for g in range(n_groups)], width


def save(fig, ax, path: pathlib.Path) -> pathlib.Path:
    """Titles the plot after its CSV and writes it beside it as PNG."""
    ax.set_title(path.stem.replace("_", " "))
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_loss(path: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in read_series(path, ["loss"]).items():
        ax.plot(steps, values["loss"], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return save(fig, ax, path)


def plot_expert_load(path: pathlib.Path) -> pathlib.Path:
    rows = read_rows(path)
    groups = [c for c in rows[0].keys() if c.startswith("group_")]
    experts = [int(r["expert"]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(experts), 1.2 + 0.5 * max(1, len(groups))))
    if groups:
        share = []
        for g in groups:
            counts = [float(r[g]) for r in rows]
            total = sum(counts) or 1.0
            share.append([c / total for c in counts])
        im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(groups)), [g.removeprefix("group_") for g in groups])
        ax.set_ylabel("group")
        for i, line in enumerate(share):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, label="share of the group's routed slots")
    else:
        ax.bar(experts, [float(r["tokens"]) for r in rows])
        ax.set_ylabel("tokens")
    ax.set_xticks(range(len(experts)), experts)
    ax.set_xlabel("expert")
    return save(fig, ax, path)


def read_series(path: pathlib.Path, columns):
    """{model: (steps, {column: values})} from a model,step,<columns> CSV."""
    series = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            steps, values = series.setdefault(row["model"], ([], {c: [] for c in columns}))
            steps.append(int(row["step"]))
            for c in columns:
                values[c].append(float(row[c]))
    return series


def plot_specialization(path: pathlib.Path) -> pathlib.Path:
    series = read_series(path, ["normalized_mi", "max_violation"])
    fig, (mi_ax, vio_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (steps, values) in series.items():
        mi_ax.plot(steps, values["normalized_mi"], label=name)
        vio_ax.plot(steps, values["max_violation"], label=name)
    mi_ax.set_ylabel("I(domain; expert) / H(domain)")
    vio_ax.set_ylabel("MaxVio")
    for ax in (mi_ax, vio_ax):
        ax.set_xlabel("step")
        ax.legend()
    return save(fig, mi_ax, path)


def plot_max_violation(path: pathlib.Path, window: int = 25) -> pathlib.Path:
    series = read_series(path, ["max_violation"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in series.items():
        ax.plot(steps, moving_average(values["max_violation"], window), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"MaxVio (mean of {window} steps)")
    ax.legend()
    return save(fig, ax, path)


def plot_experts_per_token(path: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (steps, cols)) in enumerate(read_series(path, ["all", "easy", "hard"]).items()):
        for key, style in (("all", "-"), ("easy", "--"), ("hard", ":")):
            ax.plot(steps, cols[key], color=f"C{i}", linestyle=style, label=f"{name} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("true experts per token")
    ax.legend(fontsize=7)
    return save(fig, ax, path)


def plot_drops(path: pathlib.Path) -> pathlib.Path:
    rows = read_rows(path)
    factors = sorted({float(r["capacity_factor"]) for r in rows})
    coeffs = sorted({float(r["z_coeff"]) for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, c in enumerate(coeffs):
        share = {float(r["capacity_factor"]): float(r["drop_fraction"]) for r in rows if float(r["z_coeff"]) == c}
        xs, width = bar_positions(len(factors), len(coeffs), j)
        ax.bar(xs, [100 * share.get(f, 0.0) for f in factors], width, label=f"z-loss {c:g}")
    ax.set_xticks(range(len(factors)), [f"{f:g}" for f in factors])
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("dropped slots (%)")
    ax.legend()
    return save(fig, ax, path)


def read_rows(path: pathlib.Path) -> list:
    with path.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def plot_shares(path: pathlib.Path) -> pathlib.Path:
    """Per arm, means over layers against tau: zero-computation share (and its kinds), FFN experts per token."""
    per = {}
    for r in read_rows(path):
        if r["arm"] == "vanilla":
            continue
        d = per.setdefault(r["arm"], {}).setdefault(float(r["tau"]), [])
        d.append(r)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, by_tau in per.items():
        taus = sorted(by_tau)
        mean = lambda key, t: sum(float(r[key]) for r in by_tau[t]) / len(by_tau[t])  # noqa: E731
        zc = [mean("zero", t) + mean("copy", t) + mean("constant", t) for t in taus]
        line = ax.plot(taus, zc, marker="o", label=f"{arm}: zero+copy+constant")[0]
        for key, style in (("zero", "--"), ("constant", ":"), ("copy", "-.")):
            ax.plot(taus, [mean(key, t) for t in taus], style, color=line.get_color(), label=f"{arm}: {key}")
        ax2.plot(taus, [mean("ffn_per_token", t) for t in taus], marker="o", label=arm)
    ax.set_xlabel("tau (loss weight of zero-computation experts)")
    ax.set_ylabel("share of (token, slot) pairs")
    ax.legend(fontsize=7)
    ax2.axhline(2, color="gray", linestyle="--", label="vanilla top-2")
    ax2.set_xlabel("tau")
    ax2.set_ylabel("FFN experts per token")
    ax2.legend(fontsize=8)
    return save(fig, ax, path)


def plot_throughput(path: pathlib.Path) -> pathlib.Path:
    """Measured expert-forward speed-up over vanilla top-2 against 2 / FFN experts per token, per tau."""
    rows = [r for r in read_rows(path) if r["layer"] == "all"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (key, label) in enumerate((("gain", "measured"), ("predicted_gain", "2 / FFN per token"))):
        xs, width = bar_positions(len(rows), 2, j)
        ax.bar(xs, [float(r[key]) for r in rows], width=width, label=label)
    ax.axhline(1, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"tau={float(r['tau']):g}" for r in rows])
    ax.set_ylabel("throughput vs vanilla (x)")
    ax.legend()
    return save(fig, ax, path)


def plot_logits(path: pathlib.Path) -> pathlib.Path:
    series = read_series(path, ["lse2", "max_abs_z"])
    fig, (ax, ax_max) = plt.subplots(1, 2, figsize=(10, 4))
    # Models named "<arm>_z<coeff>": one colour per arm, one line style per z-loss coefficient.
    arms = list(dict.fromkeys(name.rsplit("_z", 1)[0] for name in series))
    styles = list(dict.fromkeys(name.rsplit("_z", 1)[-1] for name in series))
    for name, (steps, values) in series.items():
        arm, z = name.rsplit("_z", 1)[0], name.rsplit("_z", 1)[-1]
        look = {"color": f"C{arms.index(arm) % 10}", "linestyle": ["-", "--", ":", "-."][styles.index(z) % 4]}
        ax.plot(steps, values["lse2"], label=name, **look)
        ax_max.plot(steps, values["max_abs_z"], label=name, **look)
    ax.set_xlabel("step")
    ax.set_ylabel("mean logsumexp(z)^2")
    ax_max.set_xlabel("step")
    ax_max.set_ylabel("max |z|")
    ax.legend(fontsize=7)
    return save(fig, ax, path)


def plot_hit_rate(path: pathlib.Path) -> pathlib.Path:
    """Bars of the prefetch hit rate (mean over layers) per predictor and prefetch size P."""
    rows = [r for r in read_rows(path) if r["layer"] == "all"]
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    sizes = sorted({int(r["P"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, p in enumerate(sizes):
        hits = {r["predictor"]: float(r["hit_rate"]) for r in rows if int(r["P"]) == p}
        xs, width = bar_positions(len(predictors), len(sizes), j)
        bars = ax.bar(xs, [hits[n] for n in predictors], width=width, label=f"P={p}")
        random = next(float(r["random"]) for r in rows if int(r["P"]) == p)
        ax.hlines([random] * len(xs), [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black",
                  linestyles=":", zorder=3, label="random P/E" if j == 0 else None)
        for x, bar in zip(xs, bars):
            ax.text(x, bar.get_height() + 0.01, f"{bar.get_height():.2f}", ha="center", fontsize=7)
    ax.axhline(0.8, color="red", linewidth=0.8, label="criterion 0.8")
    ax.set_xticks(range(len(predictors)), predictors)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("hit rate")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, ax, path)


def plot_routing(path: pathlib.Path, window: int = 25) -> pathlib.Path:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    shares = [c for c in rows[0].keys() if c not in ("model", "step")]
    series = {}
    for row in rows:
        for share in shares:
            steps, values = series.setdefault((row["model"], share), ([], []))
            steps.append(int(row["step"]))
            values.append(float(row[share]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, share), (steps, values) in series.items():
        # One training batch holds few sequences: smooth, or the noise hides the trend.
        ax.plot(steps, moving_average(values, window), label=f"{model}: {share.replace('_', ' ')}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"share (moving average of {window} steps)")
    ax.legend(fontsize=8)
    return save(fig, ax, path)


def plot_domain_eval(path: pathlib.Path) -> pathlib.Path:
    loss = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            loss.setdefault(row["model"], {})[row["domain"]] = float(row["loss"])
    models = list(loss)
    domains = sorted({d for per_domain in loss.values() for d in per_domain}, key=int)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains), 4))
    for i, model in enumerate(models):
        xs, width = bar_positions(len(domains), len(models), i)
        ax.bar(xs, [loss[model].get(d, float("nan")) for d in domains], width, label=model)
    ax.set_yscale("log")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_xlabel("domain")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    return save(fig, ax, path)


def plot_active(path: pathlib.Path) -> pathlib.Path:
    steps, active, tau = [], [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            active.append(float(row["active_experts"]))
            tau.append(float(row["tau"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, active, color="tab:blue", label="active experts per token")
    ax.set_xlabel("step")
    ax.set_ylabel("mean active experts per token", color="tab:blue")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(steps, tau, color="tab:red", linestyle="--", label="temperature τ")
    twin.set_ylabel("temperature τ", color="tab:red")
    twin.set_ylim(bottom=0)
    return save(fig, ax, path)


def log_log_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot_error(path: pathlib.Path) -> pathlib.Path:
    logs = {}  # (metric, setting) -> {n: [log error per replicate]}
    with path.open() as f:
        for row in csv.DictReader(f):
            for metric in ("density_error", "parameter_error"):
                per_n = logs.setdefault((metric, row["setting"]), {})
                per_n.setdefault(int(row["n"]), []).append(math.log(float(row[metric])))
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {}  # one colour per setting, one line style per metric
    for (metric, setting), per_n in logs.items():
        ns = sorted(per_n)
        means = [math.exp(sum(per_n[n]) / len(per_n[n])) for n in ns]
        style = "-o" if metric == "density_error" else "--s"
        color = colors.setdefault(setting, f"C{len(colors)}")
        label = f"{metric.removesuffix('_error')}, {setting} (slope {log_log_slope(ns, means):.2f})"
        ax.plot(ns, means, style, color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("error (geometric mean over replicates)")
    ax.legend(fontsize=8)
    return save(fig, ax, path)


PLOTS = [
    ("*_loss.csv", plot_loss),
    ("*_expert_load*.csv", plot_expert_load),
    ("*_specialization.csv", plot_specialization),
    ("*_max_violation.csv", plot_max_violation),
    ("*_experts_per_token.csv", plot_experts_per_token),
    ("*_drops.csv", plot_drops),
    ("*_logits.csv", plot_logits),
    ("*_shares.csv", plot_shares),
    ("*_throughput.csv", plot_throughput),
    ("*_hit_rate.csv", plot_hit_rate),
    ("*_routing.csv", plot_routing),
    ("*_domain_eval.csv", plot_domain_eval),
    ("*_active.csv", plot_active),
    ("*_error.csv", plot_error),
]
"""(file pattern, plot function): every CSV kind the examples write."""


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = pathlib.Path(sys.argv[1])
    made = [plot(path) for pattern, plot in PLOTS for path in sorted(folder.glob(pattern))]
    if not made:
        print(f"no known CSV files in {folder}", file=sys.stderr)
        return 1
    for out in made:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
