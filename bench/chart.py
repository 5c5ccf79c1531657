"""The benchmark chart: throughput, packet rate and latency of one run, side by side.

    python -m bench.chart bench/results/bench-X.json [-o out.png]

redraws the chart of a saved run. ``bench.run`` calls :func:`render` after each run.
matplotlib is the optional ``bench`` extra (``pip install '.[bench]'``), so it is imported
only inside the functions that draw: ``import bench.chart`` and :func:`available` work
without it, and the benchmark can say so in one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Reference figures from the project brief, NOT measured in this run: one TCP stream on
# this kind of machine (2 vCPUs). Drawn as dashed lines on the throughput panel so that a
# run can be read against them; keep them here, in one place.
REFERENCE_GBPS: dict[str, float] = {
    "kernel vxlan": 15.5,  # measured 15-16 Gbit/s
    "flanneld udp (C)": 0.37,  # flanneld's own udp backend
    "wireguard-go (Debian)": 0.55,
}
# Each reference line takes the colour of the setup it stands for, so a label is tied to
# its line at a glance.
REFERENCE_COLOURS = {"kernel vxlan": "#b35f12", "flanneld udp (C)": "#163f73",
                     "wireguard-go (Debian)": "#8e2f29"}

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install '.[bench]'"

# Setups that are not pyflannel: the bare underlay, the kernel's encapsulations and the
# other implementation. Everything else (udp-*, wireguard, their -v6 rows) is pyflannel.
OTHERS = ("underlay", "vxlan", "host-gw", "wireguard-go")

# Two palettes so the eye separates the families: cool hues for pyflannel, warm and
# neutral ones for references. Known setups keep their colour from run to run.
PYFLANNEL_COLOURS = {"udp-flannel": "#1f5fa8", "udp-fast": "#2a9d8f", "wireguard": "#6a4c93"}
PYFLANNEL_SPARE = ["#4a90d9", "#0f766e", "#9b7fc4", "#3b5b75", "#48c9b0", "#274c77"]
OTHER_COLOURS = {"underlay": "#8a8a8a", "vxlan": "#d9822b", "host-gw": "#b8a04a",
                 "wireguard-go": "#b5443c"}
OTHER_SPARE = ["#a0522d", "#c9a227", "#6e6e6e", "#e07b67", "#8c6d46", "#d4a373"]

WIDTH_IN, HEIGHT_IN, DPI = 16.0, 9.0, 100  # 1600 x 900 pixels
BAR = 0.38  # height of one bar; two bars per setup row
REFERENCE_ROW_PTS = 14  # height of a row of reference labels above the throughput panel


@dataclass(frozen=True)
class Metric:
    key: str
    label: str


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    metrics: tuple[Metric, Metric]
    fmt: Callable[[float], str]
    log: bool = False


def _fmt_gbps(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _fmt_pps(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


PANELS = (
    Panel("Throughput (higher is better)", "Gbit/s, log scale",
          (Metric("tcp1_gbps", "TCP, 1 stream"), Metric("tcp4_gbps", "TCP, 4 streams")),
          _fmt_gbps, log=True),
    Panel("Packet rate (higher is better)", "delivered packets/s",
          (Metric("udp1400_pps", "UDP 1400 B"), Metric("udp64_pps", "UDP 64 B")), _fmt_pps),
    Panel("Latency (lower is better)", "ping round trip, ms",
          (Metric("ping_p50_ms", "p50"), Metric("ping_p99_ms", "p99")), _fmt_ms),
)
LOSS = {"udp1400_pps": "udp1400_loss_pct", "udp64_pps": "udp64_loss_pct"}
LOG_MIN, LOG_MAX = 0.1, 30.0  # the throughput axis: 0.1 to ~20 Gbit/s plus label room


@dataclass
class Row:
    """One setup: its median, and its min-max over samples when there is more than one."""

    setup: str
    medians: dict[str, float | None]
    spread: dict[str, tuple[float, float]]
    notes: list[str]


def available() -> bool:
    """Whether the chart can be drawn (matplotlib importable), without drawing anything."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number or null, got {value!r}")
    return float(value) if math.isfinite(value) else None


def rows(doc: dict) -> list[Row]:
    """The results of a run document, checked: ValueError names what is malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError("not a benchmark document: no \"results\" list")
    out = []
    for i, res in enumerate(doc["results"]):
        if not isinstance(res, dict) or not isinstance(res.get("setup"), str):
            raise ValueError(f"results[{i}]: no \"setup\" name")
        name = res["setup"]
        samples = res.get("samples") or {}
        medians = res.get("medians") or {}
        notes = res.get("notes") or []
        if not isinstance(samples, dict) or not isinstance(medians, dict):
            raise ValueError(f"{name}: \"samples\" and \"medians\" must be objects")
        row = Row(name, {}, {}, [str(n) for n in notes] if isinstance(notes, list) else [])
        for key in sorted(set(samples) | set(medians)):
            xs = samples.get(key) or []
            if not isinstance(xs, list):
                raise ValueError(f"{name}.samples.{key}: expected a list")
            xs = [x for x in (_number(x, f"{name}.samples.{key}") for x in xs) if x is not None]
            if key in medians:
                row.medians[key] = _number(medians[key], f"{name}.medians.{key}")
            else:
                row.medians[key] = statistics.median(xs) if xs else None
            if len(xs) > 1 and row.medians[key] is not None:
                row.spread[key] = (min(xs), max(xs))
        out.append(row)
    return out


def colours(names: list[str]) -> dict[str, str]:
    """A colour per setup: pyflannel setups from the cool palette, the others from the warm.

    An IPv6 row (``-v6``) of a known setup gets a darker shade of its colour; other
    unknown setups take the next spare colour of their family.
    """
    from matplotlib.colors import to_hex, to_rgb

    spare = {True: list(PYFLANNEL_SPARE), False: list(OTHER_SPARE)}
    out = {}
    for name in names:
        base = name.removesuffix("-v6")
        mine = is_pyflannel(name)
        known = PYFLANNEL_COLOURS if mine else OTHER_COLOURS
        if name in known:
            out[name] = known[name]
        elif base in known:
            out[name] = to_hex(tuple(c * 0.65 for c in to_rgb(known[base])))
        else:
            pool = spare[mine]
            out[name] = pool.pop(0) if pool else ("#5a7fa8" if mine else "#999999")
    return out


def is_pyflannel(setup: str) -> bool:
    """Whether a setup row measures pyflannel (as opposed to a reference or another tool)."""
    return setup.removesuffix("-v6") not in OTHERS


def _light(colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * 0.55 for c in to_rgb(colour))  # type: ignore[return-value]


def _dark(colour: str) -> str:
    from matplotlib.colors import to_hex, to_rgb

    return to_hex(tuple(c * 0.8 for c in to_rgb(colour)))


def subtitle(doc: dict) -> str:
    """The machine and the caveat: figures are only comparable within one run."""
    m = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    parts = [f"{m.get('cpus', '?')} CPUs", f"kernel {m.get('kernel', '?')}",
             f"Python {m.get('python', '?')}"]
    started = doc.get("started")
    if isinstance(started, int | float) and not isinstance(started, bool):
        parts.append(time.strftime("run of %Y-%m-%d %H:%M", time.localtime(started)))
    if doc.get("quick"):
        parts.append("quick run (one short sample each)")
    return "  ·  ".join(parts) + "  —  compare ratios within one run, not absolute figures"


def figure(doc: dict) -> Figure:
    """The chart of one run as a matplotlib Figure (no pyplot: no global state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    data = rows(doc)
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.35, 1, 1]})
    colour = colours([r.setup for r in data])
    for ax, panel in zip(axes, PANELS, strict=True):
        _panel(ax, panel, data, colour)
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    for label in axes[0].get_yticklabels():
        label.set_color(_dark(colour.get(label.get_text(), "#222222")))
        label.set_fontweight("bold" if is_pyflannel(label.get_text()) else "normal")

    fig.text(0.01, 0.975, "pyflannel benchmark — medians of one run", fontsize=20,
             fontweight="bold", va="top", gid="title")
    fig.text(0.01, 0.925, subtitle(doc), fontsize=11.5, color="#444444", va="top",
             gid="subtitle")
    fig.legend(handles=[Patch(color=PYFLANNEL_COLOURS["udp-fast"], label="pyflannel"),
                        Patch(color=OTHER_COLOURS["vxlan"],
                              label="underlay, kernel and other implementations")],
               loc="upper right", bbox_to_anchor=(0.995, 0.985), ncol=2, frameon=False,
               fontsize=11)
    footer = _footer(doc, data)
    fig.text(0.01, 0.012, footer, fontsize=9, color="#555555", va="bottom", gid="footer")
    bottom = 0.03 + 0.018 * footer.count("\n")
    _title_pads(axes, 1)  # room for one row of reference labels: the usual case
    fig.tight_layout(rect=(0, bottom, 1, 0.9), w_pad=1.5)
    raised = _place_references(axes[0])
    if raised > 1:  # labels stacked higher: lift the titles and lay out again
        _title_pads(axes, raised)
        fig.tight_layout(rect=(0, bottom, 1, 0.9), w_pad=1.5)
    return fig


def _title_pads(axes: Any, rows: int) -> None:
    for ax, panel in zip(axes, PANELS, strict=True):  # titles level, above the labels
        ax.set_title(panel.title, fontsize=14, fontweight="bold", loc="left",
                     pad=8 + rows * REFERENCE_ROW_PTS)


def _footer(doc: dict, data: list[Row]) -> str:
    lines = ["Dashed lines: reference figures for one TCP stream, from the project brief, "
             "not measured in this run.   Error bars: min–max over samples.   "
             "Packet rate: delivered packets/s (loss at the offered rate)."]
    notes = [f"{r.setup}: {n}" for r in data for n in r.notes]
    if notes:
        line = "Notes: " + ";  ".join(notes)
        lines.append(line if len(line) <= 220 else line[:217] + "...")
    return "\n".join(lines)


def _panel(ax: Axes, panel: Panel, data: list[Row], colour: dict[str, str]) -> None:
    n = len(data)
    ys = list(range(n))
    ends = [r.spread[m.key][1] if m.key in r.spread else r.medians.get(m.key) or 0.0
            for r in data for m in panel.metrics]  # where each bar, or its error bar, ends
    top = max([0.0, *ends])
    if panel.log:
        ax.set_xscale("log")
        lo, hi = LOG_MIN, max(LOG_MAX, top * 2.2, max(REFERENCE_GBPS.values(), default=0) * 2)
    else:
        lo, hi = 0.0, (top * 1.3 if top > 0 else 1.0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)  # first setup on top

    for row, y in zip(data, ys, strict=True):
        for j, metric in enumerate(panel.metrics):
            yy = y + (j - 0.5) * (BAR + 0.02)
            value = row.medians.get(metric.key)
            base = colour[row.setup]
            face = base if j == 0 else _light(base)
            if value is None:
                ax.text(lo * 1.08 if panel.log else hi * 0.01, yy, "n/a", va="center",
                        ha="left", fontsize=9, style="italic", color="#888888",
                        gid=f"n/a:{row.setup}:{metric.key}")
                continue
            left = 0.0 if not panel.log else lo
            width = max(value - left, 0.0)
            (bar,) = ax.barh(yy, width, left=left, height=BAR, color=face, edgecolor=base,
                             linewidth=0.8)
            bar.set_gid(f"bar:{row.setup}:{metric.key}")
            end = value
            if metric.key in row.spread:
                smin, smax = row.spread[metric.key]
                ax.errorbar(value, yy, xerr=[[value - smin], [smax - value]], fmt="none",
                            ecolor="#222222", elinewidth=1, capsize=3,
                            gid=f"err:{row.setup}:{metric.key}")
                end = max(end, smax)
            text = panel.fmt(value)
            loss = row.medians.get(LOSS.get(metric.key, ""))
            if loss is not None and loss >= 0.05:
                text += f" ({loss:.0f}% lost)" if loss >= 1 else f" ({loss:.1f}% lost)"
            x = max(end, lo) * 1.07 if panel.log else max(end, 0) + hi * 0.012
            ax.text(x, yy, text, va="center", ha="left", fontsize=9, color="#222222",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                          "edgecolor": "none", "alpha": 0.85},  # readable over a dashed line
                    zorder=3, gid=f"value:{row.setup}:{metric.key}")

    ax.set_yticks(ys, [r.setup for r in data], fontsize=11)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(panel.xlabel, fontsize=11)
    ax.grid(axis="x", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if panel.log:
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        from matplotlib.ticker import FuncFormatter

        if panel.fmt is _fmt_pps:
            ax.xaxis.set_major_formatter(
                FuncFormatter(lambda v, _p: f"{v / 1000:g}k" if v else "0"))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="#555555", edgecolor="#555555",
                             label=panel.metrics[0].label),
                       Patch(facecolor=_light("#555555"), edgecolor="#555555",
                             label=panel.metrics[1].label)],
              loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, frameon=False,
              fontsize=10, handlelength=1.4)


def _place_references(ax: Axes) -> int:
    """Draw the dashed reference lines, each labelled just above the panel at its own x.

    A label goes left of its line if it fits there, else right; in the first row it may
    not cross another reference line, and a label that fits nowhere goes up a row with a
    dotted leader. Widths are measured with the renderer once the layout is known, so the
    labels do not overlap whatever the reference values are. Returns the rows used.
    """
    from matplotlib.transforms import blended_transform_factory, offset_copy

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    box = ax.get_window_extent(renderer)
    refs = sorted(((v, k) for k, v in REFERENCE_GBPS.items() if lo < v < hi))
    xs = [ax.transData.transform((v, 1.0))[0] for v, _k in refs]
    taken: list[list[tuple[float, float]]] = []  # per row: pixel spans already used
    gap, row_pts = 3.0, REFERENCE_ROW_PTS
    for (value, name), x in zip(refs, xs, strict=True):
        colour = REFERENCE_COLOURS.get(name, "#333333")
        ax.axvline(value, color=colour, linestyle=(0, (5, 3)), linewidth=1.3, zorder=1.5,
                   gid=f"reference:{name}")
        label = f"{name} {value:g}"
        probe = ax.text(value, 1.0, label, fontsize=9.5, transform=trans)
        width = probe.get_window_extent(renderer).width + 2
        probe.remove()

        def fits(a: float, b: float, row: int, x: float = x) -> bool:
            if a < box.x0 - 30 or b > box.x1 + 30:
                return False
            if row == 0 and any(a - 2 <= o <= b + 2 for o in xs if o != x):
                return False
            return all(b + 6 <= s0 or a >= s1 + 6 for s0, s1 in taken[row])

        for row in range(len(taken) + 1):
            if row == len(taken):
                taken.append([])
            spans = (("right", x - gap - width, x - gap), ("left", x + gap, x + gap + width))
            choice = next((c for c in spans if fits(c[1], c[2], row)), None)
            if choice is not None or row > len(refs):
                break
        ha, a, b = choice or ("left", x + gap, x + gap + width)
        taken[row].append((a, b))
        at = offset_copy(trans, fig=fig, x=-gap if ha == "right" else gap,
                         y=3 + row * row_pts, units="points")
        ax.text(value, 1.0, label, fontsize=9.5, ha=ha, va="bottom", transform=at,
                color=colour, gid=f"reference-label:{name}")
        if row:  # a leader from the top of the panel up to a raised label
            ax.annotate("", xy=(value, 1.0), xycoords=trans,
                        xytext=(0, 3 + row * row_pts + 8), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.9,
                                    "linestyle": ":", "shrinkA": 0, "shrinkB": 0})
    while taken and not taken[-1]:
        taken.pop()
    return len(taken)


def render(doc: dict, path: str | Path) -> None:
    """Write the chart of a run document as a PNG (1600x900) to ``path``.

    Raises ImportError when matplotlib is missing (check :func:`available` first) and
    ValueError when the document is malformed.
    """
    fig = figure(doc)
    fig.savefig(Path(path), dpi=DPI, facecolor="white")


def main(argv: list[str] | None = None) -> int:
    """Redraw the chart of a saved run: exit 1 on an unreadable JSON, 2 without matplotlib."""
    ap = argparse.ArgumentParser(prog="python -m bench.chart",
                                 description="Redraw the chart of a saved benchmark run.")
    ap.add_argument("json", help="a bench/results/bench-*.json file")
    ap.add_argument("-o", "--out", help="the PNG to write (default: the JSON's name, .png)")
    args = ap.parse_args(argv)
    src = Path(args.json)
    try:
        doc = json.loads(src.read_text())
        rows(doc)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"bench.chart: cannot read {src}: {reason.splitlines()[0]}", file=sys.stderr)
        return 1
    if not available():
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src.with_suffix(".png")
    try:
        render(doc, out)
    except OSError as e:
        print(f"bench.chart: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
