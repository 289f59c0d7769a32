"""PNG plots of a latency benchmark result (`edgespec.bench.latency`), matplotlib on Agg.

`plot_latency(result, out_dir)` writes three files and returns their paths:

- ``tokens_per_s_vs_rtt.png``: median tokens/s per method against RTT (symlog x: 0 is on the
  axis), [min, max] over reps as error bars; the jitter and bandwidth cases as separate markers at
  their nominal RTT; in-process methods (co-located, edge-only draft) as horizontal lines; the
  crossover RTTs (cloud-only against chains, and against token trees) as vertical lines.
- ``k_vs_rtt.png``: mean draft length chosen against RTT per adaptive method, and the share of
  tokens they took from cloud-only decoding.
- ``varying_rtt.png``: the time-varying run: scheduled and measured RTT over time, the adaptive
  methods' k per round over time (cloud-only steps marked), tokens/s per method.

Every title names the compute profile (with "emulated" when it is) and the link emulator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only (must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

_MARKERS = {"jitter": "x", "bandwidth": "s"}
_CASE_OFFSET = {"jitter": 0.93, "bandwidth": 1.07}  # side by side when both sit at one RTT
_IN_PROCESS_STYLE = {"colocated": "--", "edge_only_draft": ":"}


def profile_label(result: dict) -> str:
    """The compute profile (saying whether it is emulated) and the link, for titles."""
    profiles = result.get("profiles", {})
    compute = profiles.get("compute", {})
    name = compute.get("name", "?") if isinstance(compute, dict) else str(compute)
    how = " (EMULATED compute times)" if profiles.get("compute_emulated") else " (not emulated)"
    return f"compute profile: {name}{how} | link: emulated (TCP proxy)"


def _link_note(result: dict) -> str:
    cases = [r for r in result.get("link_conditions", []) if r["case"] != "rtt"]
    return "; ".join(f"{c['case']}: {c['profile']['name']}" for c in cases)


def _rtt_axis(ax, rows: Sequence[dict]) -> None:
    """Symlog x (RTT 0 stays on the axis) ticked at the grid's RTTs."""
    ax.set_xscale("symlog", linthresh=5.0)
    ticks = sorted({r["rtt_ms"] for r in rows if not r["in_process"]})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlim(-0.5, max(ticks[-1] * 1.3, 1.0))
    ax.set_xlabel("RTT (ms, symlog scale)")


def _method_order(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def plot_tokens_per_s(result: dict, path: str | Path) -> Path:
    """Tokens/s against RTT per method (see the module docstring)."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # The y range follows the link methods: a far faster in-process line (the draft alone, whose
    # output is not the target's) would squash them; it is named in the legend instead.
    link_max = max((r["tokens_per_s"] for r in rows if not r["in_process"]), default=0.0)
    top = 1.25 * link_max if link_max > 0 else None
    for i, method in enumerate(_method_order(rows)):
        colors[method] = cycle[i % len(cycle)]
        # a variant ("..._cold") is drawn dashed in its base method's colour family
        style = "--" if method.endswith("_cold") else "-"
        grid = sorted(
            (r for r in rows if r["method"] == method and r["case"] == "rtt"),
            key=lambda r: r["rtt_ms"],
        )
        in_process = [r for r in rows if r["method"] == method and r["in_process"]]
        if grid:
            x = [r["rtt_ms"] for r in grid]
            y = [r["tokens_per_s"] for r in grid]
            lo = [
                r["tokens_per_s"] - (r["tokens_per_s_spread"] or [r["tokens_per_s"]] * 2)[0]
                for r in grid
            ]
            hi = [
                (r["tokens_per_s_spread"] or [r["tokens_per_s"]] * 2)[1] - r["tokens_per_s"]
                for r in grid
            ]
            ax.errorbar(
                x,
                y,
                yerr=[lo, hi],
                marker="o",
                ms=4,
                capsize=2,
                label=method,
                color=colors[method],
                ls=style,
            )
        for r in in_process:
            label = f"{method}" + (f" (k={r['k']})" if r.get("k") else "") + ", no link"
            if top is not None and r["tokens_per_s"] > top:
                ax.plot([], [], ls="none", label=f"{label}: {r['tokens_per_s']:.0f} (off scale)")
                continue
            ax.axhline(
                r["tokens_per_s"],
                ls=_IN_PROCESS_STYLE.get(method, "-."),
                color=colors[method],
                label=label,
            )
        for r in rows:
            if r["method"] == method and r["case"] in _MARKERS:
                ax.scatter(
                    [r["rtt_ms"] * _CASE_OFFSET[r["case"]]],
                    [r["tokens_per_s"]],
                    marker=_MARKERS[r["case"]],
                    color=colors[method],
                    s=40,
                    zorder=3,
                )
    for case, marker in _MARKERS.items():
        if any(r["case"] == case for r in rows):
            ax.scatter([], [], marker=marker, color="gray", label=f"{case} case")
    crossovers = (
        ("chains", result.get("crossover_rtt_ms"), "-."),
        ("trees", result.get("checks", {}).get("trees", {}).get("crossover_rtt_ms_trees"), ":"),
    )
    for what, rtt, style in crossovers:
        if rtt is not None:
            label = f"cloud-only beats {what} from {rtt:g} ms"
            ax.axvline(rtt, color="gray", lw=0.8, ls=style, label=label)
    _rtt_axis(ax, rows)
    if top is not None:
        ax.set_ylim(0, top)
    ax.set_ylabel("tokens/s (median over reps, bars: min-max)")
    note = _link_note(result)
    ax.set_title(
        f"Tokens/s vs RTT\n{profile_label(result)}" + (f"\n{note}" if note else ""), fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_k_vs_rtt(result: dict, path: str | Path) -> Path:
    """Mean chosen k and cloud-only token share against RTT for the adapting methods."""
    rows = [r for r in result["rows"] if r["case"] == "rtt" and not r["in_process"]]
    adapting = [
        m for m in _method_order(rows) if m in ("heuristic", "adaptive", "adaptive_pipelined")
    ]
    fig, (ax_k, ax_c) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for method in adapting:
        grid = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rtt_ms"])
        x = [r["rtt_ms"] for r in grid]
        ax_k.plot(
            x,
            # no speculative round (all cloud-only): no k to show, a gap rather than a 0
            [r["mean_k"] if r.get("rounds") else float("nan") for r in grid],
            marker="o",
            label=method,
        )
        ax_c.plot(
            x, [r.get("cloud_only_token_share") or 0.0 for r in grid], marker="o", label=method
        )
    ax_k.set_ylabel("mean k of speculative rounds\n(gap: no speculative round)")
    ax_c.set_ylabel("share of tokens from cloud-only")
    ax_c.set_ylim(-0.05, 1.05)
    _rtt_axis(ax_c, rows)
    ax_k.set_title(f"Chosen draft length vs RTT\n{profile_label(result)}", fontsize=9)
    for ax in (ax_k, ax_c):
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=8)
    return _save(fig, path)


def plot_varying(result: dict, path: str | Path) -> Path | None:
    """The time-varying RTT run; None when the result has none."""
    varying = result.get("varying")
    if not varying:
        return None
    fig = plt.figure(figsize=(9, 9))
    grid = fig.add_gridspec(3, 1, height_ratios=[1, 1.3, 1])
    ax_r = fig.add_subplot(grid[0])
    ax_k = fig.add_subplot(grid[1], sharex=ax_r)  # RTT and k on one time axis
    ax_b = fig.add_subplot(grid[2])
    schedule = varying["schedule"]
    times = [s["t_s"] for series in varying["series"].values() for s in series if s["t_s"]]
    end = max(times) if times else schedule[-1]["start_s"]
    # the schedule as far as the generations got
    shown = [p for p in schedule if p["start_s"] <= end]
    xs = [p["start_s"] for p in shown] + [end]
    ys = [p["rtt_ms"] for p in shown] + [shown[-1]["rtt_ms"]]
    ax_r.step(xs, ys, where="post", color="black", label="RTT set")
    for method, series in varying["series"].items():
        pts = [s for s in series if s["t_s"] is not None and s["mode"] != "cloud_only"]
        ax_r.scatter(
            [s["t_s"] for s in pts],
            [s["network_ms"] for s in pts],
            s=6,
            alpha=0.5,
            label=f"{method}: measured per round",
        )
        spec = [s for s in series if s["t_s"] is not None]
        # a round's k held from the previous verdict to its own
        ax_k.step([s["t_s"] for s in spec], [s["k"] for s in spec], where="pre", label=method)
        cloud = [s for s in spec if s["mode"] == "cloud_only"]
        if cloud:
            ax_k.scatter(
                [s["t_s"] for s in cloud],
                [0] * len(cloud),
                marker="|",
                s=60,
                label=f"{method}: cloud-only steps",
            )
    for p in shown[1:]:
        for ax in (ax_r, ax_k):
            ax.axvline(p["start_s"], color="gray", lw=0.6, ls=":")
    ax_r.set_ylabel("RTT (ms)")
    _legend(ax_r, fontsize=7)
    ax_k.set_ylabel("k per round (0 = cloud-only)")
    ax_k.set_xlabel("time since the generation started (s)")
    _legend(ax_k, fontsize=7)
    tps = varying["tokens_per_s"]
    names = list(tps)
    spread = varying.get("tokens_per_s_spread", {})
    err = [
        [tps[n] - spread.get(n, [tps[n], tps[n]])[0] for n in names],
        [spread.get(n, [tps[n], tps[n]])[1] - tps[n] for n in names],
    ]
    ax_b.bar(
        names,
        [tps[n] for n in names],
        yerr=err,
        capsize=3,
        color=["C0" if n.startswith("adaptive") else "C7" for n in names],
    )
    ax_b.set_ylabel("tokens/s")
    ax_b.tick_params(axis="x", labelsize=8, rotation=20)
    rtts = " -> ".join(f"{p['rtt_ms']:g}" for p in schedule)
    head = f"Time-varying RTT ({rtts} ms), {varying['max_new_tokens']} tokens"
    ax_r.set_title(f"{head}\n{profile_label(result)}", fontsize=9)
    for ax in (ax_r, ax_k, ax_b):
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_latency(result: dict, out_dir: str | Path) -> list[Path]:
    """All latency plots of `result` into `out_dir` (created); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_tokens_per_s(result, out / "tokens_per_s_vs_rtt.png"),
        plot_k_vs_rtt(result, out / "k_vs_rtt.png"),
    ]
    varying = plot_varying(result, out / "varying_rtt.png")
    if varying is not None:
        paths.append(varying)
    return paths


def _legend(ax, **kwargs) -> None:
    """A legend only when something is labelled (an empty one warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
