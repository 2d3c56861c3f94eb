"""results.json -> a PNG: req/s and p99 vs threads per configuration, and the HTTP run.

``python -m bench.plot bench/results/results.json bench/results/results.png``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.report import HEROKUPOOL, inprocess_summary, summarize_runs

__all__ = ["render"]

STYLES: dict[str, dict[str, Any]] = {
    "no-pool": {"color": "#999999", "linestyle": ":", "marker": "x"},
    "ceiling": {"color": "#444444", "linestyle": "--", "marker": "s"},
    "django-pool": {"color": "#1f77b4", "marker": "o"},
    "dbcp-pg2": {"color": "#ff7f0e", "marker": "v"},
    "dbcp-pg3": {"color": "#bcbd22", "marker": "^"},
    "postgrespool2": {"color": "#9467bd", "marker": "D"},
    "pgbouncer": {"color": "#8c564b", "marker": "P"},
    "pgbouncer-connect": {"color": "#c49c94", "linestyle": ":", "marker": "P"},
    HEROKUPOOL: {"color": "#d62728", "marker": "*", "linewidth": 2.5, "markersize": 11},
    "herokupool-pg3": {"color": "#e377c2", "marker": "*", "linewidth": 2.5, "markersize": 11},
    "heroku-template": {"color": "#17becf", "marker": "v", "linestyle": "--"},
}


def render(results: dict[str, Any], path: Path) -> None:
    labels = {c["name"]: c["label"] for c in results["meta"]["configs"]}
    summary = inprocess_summary(results)
    threads = sorted(summary, key=int)
    names = [
        c["name"] for c in results["meta"]["configs"] if c["name"] in summary.get(threads[0], {})
    ]
    http = summarize_runs(results.get("http", {}))
    five = {t: summarize_runs(runs) for t, runs in results.get("inprocess5", {}).items()}
    fig, grid = plt.subplots(2, 2, figsize=(13, 10.5), constrained_layout=True)
    rps_ax, p99_ax = grid[0][0], grid[0][1]
    five_ax, http_ax = grid[1][0], grid[1][1]
    xs = [int(t) for t in threads]
    for name in names:
        style = {"linewidth": 1.5, "markersize": 7, **STYLES.get(name, {})}
        rps = [summary[t][name]["rps"]["median"] for t in threads]
        p99 = [summary[t][name]["p99"] * 1e3 for t in threads]
        rps_ax.plot(xs, rps, label=labels.get(name, name), **style)
        p99_ax.plot(xs, p99, label=labels.get(name, name), **style)
    # A pool that starves threads keeps a low p99 (the few starved waits drown in the
    # fast requests of the others): say so on the plot.
    last = threads[-1]
    starving = [
        f"{labels.get(n, n)}: {summary[last][n]['starved_threads']} of {last} threads starved"
        for n in names
        if summary[last][n]["starved_threads"]
    ]
    if starving:
        p99_ax.text(
            0.98,
            0.03,
            f"at T={last}:\n" + "\n".join(starving),
            transform=p99_ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"},
        )
    size = results["meta"]["plan"]["size"]
    for ax in (rps_ax, p99_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("threads (in-process WSGI)")
        ax.grid(True, alpha=0.3)
    rps_ax.set_ylabel("requests/s (median of rounds)")
    rps_ax.set_title(f"Throughput, pools hold {size} server connections")
    rps_ax.set_ylim(bottom=0)
    p99_ax.set_yscale("log")
    p99_ax.set_ylabel("p99 latency, ms (log)")
    p99_ax.set_title("p99 latency (in-flight requests counted)")
    rps_ax.legend(fontsize=8, loc="best")
    if five:
        threads5 = sorted(five, key=int)
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [five[t][name]["rps"]["median"] if name in five[t] else 0.0 for t in threads5]
            five_ax.bar(
                [j + i * width for j in range(len(threads5))],
                values,
                width,
                label=labels.get(name, name),
                color=STYLES.get(name, {}).get("color", "#777777"),
            )
        five_ax.set_xticks(
            [j + width * (len(names) - 1) / 2 for j in range(len(threads5))],
            [f"T={t}" for t in threads5],
        )
        five_ax.set_ylabel("requests/s (median of rounds)")
        five_ax.set_title("Five statements per request")
        five_ax.grid(True, axis="y", alpha=0.3)
    else:
        five_ax.set_visible(False)
    if http:
        ax = http_ax
        order = [name for name in names if name in http]
        values = [http[name]["rps"]["median"] for name in order]
        colors = [STYLES.get(name, {}).get("color", "#777777") for name in order]
        bars = ax.barh([labels.get(n, n) for n in order], values, color=colors)
        for bar, value in zip(bars, values, strict=True):
            ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:,.0f}", va="center")
        ax.invert_yaxis()
        ax.set_xlabel("requests/s")
        plan = results["meta"]["plan"]
        ax.set_title(
            f"HTTP: gunicorn gthread {plan['http_workers']}x{plan['http_threads']}, "
            f"{plan['http_connections']} connections"
        )
        ax.set_xlim(right=max(values) * 1.2)
        ax.tick_params(axis="y", labelsize=8)
    else:
        http_ax.set_visible(False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot")
    parser.add_argument("results", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    render(json.loads(args.results.read_text()), args.png)


if __name__ == "__main__":
    main()
