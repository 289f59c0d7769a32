"""Plots of a capacity run (`edgespec.bench.capacity`): replica tokens/s against sessions, and
per-session tokens/s against replica tokens/s (the latency-throughput frontier), one panel per
RTT, one line per method."""

from __future__ import annotations

import textwrap
from pathlib import Path

from edgespec.bench.plots import plt, profile_label


def _panels(result: dict):
    rtts = sorted({r["rtt_ms"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(rtts), figsize=(6 * len(rtts), 4.5), squeeze=False)
    return rtts, fig, axes[0]


def _lines(rows: list[dict], rtt: float) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["rtt_ms"] == rtt:
            admission = r.get("kv_admission")  # overload runs: one line per admission mode
            label = r["method"] if admission is None else f"{r['method']} [{admission}]"
            out.setdefault(label, []).append(r)
    return {m: sorted(rs, key=lambda r: r["sessions"]) for m, rs in out.items()}


def plot_capacity(result: dict, out_dir: str | Path) -> list[Path]:
    """Write capacity_vs_sessions.png and capacity_frontier.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, x_key, y_key, x_label, y_label, logx in (
        (
            "capacity_vs_sessions.png",
            "sessions",
            "replica_tokens_per_s",
            "sessions per verifier",
            "replica tokens/s",
            True,
        ),
        (
            "capacity_frontier.png",
            "replica_tokens_per_s",
            "session_tokens_per_s_median",
            "replica tokens/s",
            "per-session tokens/s (median)",
            False,
        ),
    ):
        rtts, fig, axes = _panels(result)
        for ax, rtt in zip(axes, rtts, strict=True):
            for method, rows in _lines(result["rows"], rtt).items():
                ax.plot(
                    [r[x_key] for r in rows], [r[y_key] for r in rows], marker="o", label=method
                )
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.set_title(f"RTT {rtt:g} ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        edges = result.get("edge_emulation", "")
        note = " | edge devices emulated" if edges.startswith("EMULATED") else ""
        if result.get("verifier_emulation", "").startswith("EMULATED"):
            note += " | cloud GPU emulated"
        title = f"One verifier replica, N edges | {profile_label(result)}{note}"
        fig.suptitle("\n".join(textwrap.wrap(title, 45 * len(rtts) + 30)), fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
