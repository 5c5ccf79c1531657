"""The benchmark chart: what a run's PNG shows, and how ``python -m bench.chart`` behaves.

matplotlib is the ``bench`` extra, installed in CI by scripts/setup.sh: nothing here skips.
Drawing costs about a second, so the full figure is built once and inspected by many tests.
"""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.text import Text

from bench import chart

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# tcp1 / tcp4 Gbit/s (three samples each), then one sample of everything else.
MEASURED = {
    "underlay": ([21.5, 23.0, 22.1], [27.0, 28.3, 26.1], 94_000, 98_000, 0.045, 0.09),
    "udp-flannel": ([0.92, 1.01, 0.97], [1.2, 1.3, 1.25], 31_000, 52_000, 0.61, 1.4),
    "udp-fast": ([3.9, 4.2, 4.05], [4.3, 4.5, 4.4], 35_870, 49_657, 0.69, 0.88),
    "wireguard": ([1.1, 1.2, 1.15], None, 29_000, 41_000, 0.8, 1.9),  # tcp4 not measured
    "wireguard-go": ([0.52, 0.56, 0.55], [0.6, 0.61, 0.62], 24_000, 30_000, 0.5, 1.1),
    "vxlan": ([14.8, 15.9, 15.3], [17.0, 18.2, 17.5], 90_000, 95_000, 0.06, 0.12),
    "host-gw": ([19.0, 20.5, 20.1], [24.0, 25.0, 24.4], 93_000, 97_000, 0.05, 0.1),
}


def run_doc() -> dict:
    """A document shaped like the one bench/run.py main() writes, for all seven setups."""
    results = []
    for name, (tcp1, tcp4, u1400, u64, p50, p99) in MEASURED.items():
        samples = {"ping_p50_ms": [p50], "ping_p99_ms": [p99], "tcp1_gbps": tcp1,
                   "udp1400_pps": [u1400], "udp1400_loss_pct": [100 - u1400 / 1000],
                   "udp64_pps": [u64], "udp64_loss_pct": [100 - u64 / 1000]}
        if tcp4:
            samples["tcp4_gbps"] = tcp4
        results.append({"setup": name, "samples": samples, "notes": [],
                        "medians": {k: statistics.median(v) for k, v in samples.items()}})
    results[1]["medians"]["ping_p99_ms"] = None  # a null median: drawn as missing too
    return {"started": 1795839880.6, "seconds": 400.0, "quick": False,
            "plan": {"tcp_runs": 3, "tcp_seconds": 8, "udp_seconds": 4, "pings": 200,
                     "udp_pps": 100000},
            "machine": {"cpus": 2, "kernel": "6.18.44-test", "python": "3.11.7"},
            "results": results}


@pytest.fixture(scope="module")
def fig():
    return chart.figure(run_doc())


def by_gid(fig, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.findobj(lambda a: a.get_gid() == gid)] + [
        t for t in fig.texts if t.get_gid() == gid]


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_a_run_of_the_seven_setups_renders_a_1600x900_png(tmp_path):
    out = tmp_path / "run.png"
    chart.render(run_doc(), out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert png_size(data) == (1600, 900)
    assert len(data) > 30_000  # bars, labels and text, not an empty canvas


def test_three_panels_throughput_packet_rate_and_latency(fig):
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert len(fig.axes) == 3
    assert [t.split(" (")[0] for t in titles] == ["Throughput", "Packet rate", "Latency"]
    assert "lower is better" in titles[2]


def test_throughput_is_on_a_log_axis_from_0_1_to_about_20_gbits(fig):
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
    assert lo == pytest.approx(0.1) and hi >= 20


def test_every_setup_has_a_row_in_run_order_level_across_the_panels(fig):
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(MEASURED)
    for ax in fig.axes:
        assert list(ax.get_yticks()) == list(range(len(MEASURED)))
        assert ax.get_ylim() == fig.axes[0].get_ylim()


def test_title_and_subtitle_name_the_run_the_machine_and_the_caveat(fig):
    (title,) = by_gid(fig, "title")
    (sub,) = by_gid(fig, "subtitle")
    assert title.get_text() == "pyflannel benchmark — medians of one run"
    for part in ("2 CPUs", "kernel 6.18.44-test", "Python 3.11.7",
                 "compare ratios within one run, not absolute figures"):
        assert part in sub.get_text()


def test_reference_figures_are_dashed_lines_with_a_label(fig):
    assert chart.REFERENCE_GBPS == {"kernel vxlan": 15.5, "flanneld udp (C)": 0.37,
                                    "wireguard-go (Debian)": 0.55}
    for name, gbps in chart.REFERENCE_GBPS.items():
        (line,) = by_gid(fig, f"reference:{name}")
        assert set(line.get_xdata()) == {gbps}
        assert line.get_linestyle() == "--"
        (label,) = by_gid(fig, f"reference-label:{name}")
        assert label.get_text() == f"{name} {gbps:g}"
    for ax in fig.axes[1:]:  # throughput only
        assert not ax.findobj(lambda a: str(a.get_gid()).startswith("reference"))
    assert "not measured in this run" in by_gid(fig, "footer")[0].get_text()


def test_each_measured_value_is_a_bar_labelled_with_its_median(fig):
    bar = by_gid(fig, "bar:udp-fast:tcp1_gbps")[0]
    assert bar.get_x() + bar.get_width() == pytest.approx(4.05)
    assert by_gid(fig, "value:udp-fast:tcp1_gbps")[0].get_text() == "4.05"
    assert by_gid(fig, "value:vxlan:tcp4_gbps")[0].get_text() == "17.5"
    assert by_gid(fig, "value:udp-fast:udp1400_pps")[0].get_text() == "35.9k (64% lost)"
    assert by_gid(fig, "value:underlay:ping_p50_ms")[0].get_text() == "0.045"


def test_a_missing_metric_draws_no_bar_and_says_n_a(fig):
    for setup, metric in (("wireguard", "tcp4_gbps"), ("udp-flannel", "ping_p99_ms")):
        assert by_gid(fig, f"bar:{setup}:{metric}") == []
        assert by_gid(fig, f"value:{setup}:{metric}") == []
        (na,) = by_gid(fig, f"n/a:{setup}:{metric}")
        assert na.get_text() == "n/a"


def test_error_bars_span_min_to_max_only_where_there_are_several_samples(fig):
    (bars,) = [a for a in by_gid(fig, "err:vxlan:tcp1_gbps") if hasattr(a, "get_segments")]
    ((start, end),) = bars.get_segments()
    assert (start[0], end[0]) == pytest.approx((14.8, 15.9))
    assert by_gid(fig, "err:vxlan:udp1400_pps") == []  # one sample: no spread to show


def test_no_two_labels_overlap(fig):
    renderer = fig.canvas.get_renderer()
    texts = [*fig.texts, *fig.axes[0].get_yticklabels()]
    for ax in fig.axes:
        texts += ax.texts
        texts += ax.findobj(lambda a, ax=ax: isinstance(a, Text)
                            and a.get_text() == ax.get_title(loc="left"))
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
    overlaps = [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    assert overlaps == []
    width, height = fig.canvas.get_width_height()
    for text, box in boxes:
        assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, text


def test_pyflannel_setups_and_the_others_have_separate_palettes():
    names = [*MEASURED, "udp-fast-v6", "udp-flannel-nocoalesce", "wireguard-go-v6"]
    colours = chart.colours(names)
    mine = {colours[n] for n in names if chart.is_pyflannel(n)}
    others = {colours[n] for n in names if not chart.is_pyflannel(n)}
    assert len(set(colours.values())) == len(names)  # a colour per setup
    assert not mine & others
    assert chart.is_pyflannel("udp-flannel-nocoalesce") and chart.is_pyflannel("udp-fast-v6")
    assert not chart.is_pyflannel("wireguard-go-v6") and not chart.is_pyflannel("host-gw")
    assert chart.colours(["vxlan", "udp-fast"]) == {k: colours[k] for k in ("vxlan", "udp-fast")}


def test_medians_come_from_samples_when_the_document_has_none():
    (row,) = chart.rows({"results": [{"setup": "udp-fast", "samples": {"tcp1_gbps": [1, 3, 2]}}]})
    assert row.medians == {"tcp1_gbps": 2}
    assert row.spread == {"tcp1_gbps": (1, 3)}


@pytest.mark.parametrize("doc", [[], {}, {"results": {}}, {"results": [{"samples": {}}]},
                                 {"results": [{"setup": "x", "medians": {"tcp1_gbps": "3"}}]}])
def test_a_malformed_document_is_a_value_error(doc):
    with pytest.raises(ValueError):
        chart.rows(doc)


def test_main_redraws_the_chart_of_a_saved_run_beside_it(tmp_path, capsys):
    saved = tmp_path / "bench-20260101-000000.json"
    doc = run_doc()
    doc["results"] = doc["results"][2:4]  # a small run: this is about files, not drawing
    saved.write_text(json.dumps(doc))
    assert chart.main([str(saved)]) == 0
    png = tmp_path / "bench-20260101-000000.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert str(png) in capsys.readouterr().out


@pytest.mark.parametrize("content", ["{not json", '{"results": 3}', None])
def test_main_on_a_missing_or_malformed_json_says_why_in_one_line_and_returns_1(
        tmp_path, capsys, content):
    saved = tmp_path / "bench.json"
    if content is not None:
        saved.write_text(content)
    assert chart.main([str(saved), "-o", str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench.chart: cannot read") and err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def run_without_matplotlib(code: str) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib fails
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_without_matplotlib_the_module_imports_and_main_exits_2(tmp_path):
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(run_doc()))
    out = run_without_matplotlib(
        "import bench.chart as c\n"
        "assert not c.available()\n"
        f"sys.exit(c.main([{str(saved)!r}]))\n")
    assert out.returncode == 2, out.stderr
    assert out.stderr == "matplotlib is not installed: pip install '.[bench]'\n"
    assert not saved.with_suffix(".png").exists()


def test_importing_the_module_does_not_import_matplotlib():
    out = subprocess.run([sys.executable, "-c", "import sys, bench.chart; "
                          "print('matplotlib' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False"], out.stderr
    assert chart.available()  # here, as in CI, it is installed
