"""Figures: files written, one ECE-vs-accuracy panel per pair, distinct method styles, count strips."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex, to_rgba  # noqa: E402

from kdbench._io import current_umask  # noqa: E402
from kdbench.sweep import load_suite  # noqa: E402
from kdbench.sweep.figures import (  # noqa: E402
    PALETTE,
    REFERENCE_MARKERS,
    STUDENT_MARKERS,
    _pooled_bins,
    ece_accuracy_figure,
    legend_order,
    method_styles,
    reliability_figure,
    write_figures,
)
from kdbench.sweep.runner import run_suite  # noqa: E402
from kdbench.sweep.store import load_records  # noqa: E402
from kdbench.sweep.tables import model_rows  # noqa: E402

TINY = Path(__file__).parent / "data" / "tiny_suite.toml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    suite = load_suite(TINY)
    run_suite(suite, results_root=root / "res", cache_dir=root / "cache", say=quiet)
    found, missing = load_records(root / "res" / "tiny" / "runs", suite.runs)
    assert found and not missing
    return suite, found, model_rows(found), root


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _rgb(colour) -> str | None:
    """The colour as #rrggbb, or None where it does not show (transparent or white)."""
    rgba = to_rgba(colour)
    if rgba[3] == 0:
        return None
    hexa = to_hex(rgba, keep_alpha=False).lower()
    return None if hexa == "#ffffff" else hexa


def _colours(artists) -> set[str]:
    """Every colour the artists put on the canvas (face, edge, hatch, line, marker)."""
    from matplotlib.collections import Collection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    out: list = []
    for a in artists:
        if isinstance(a, Patch):
            if a.get_fill():
                out.append(a.get_facecolor())
            if a.get_linewidth() > 0 or a.get_hatch():
                out.append(a.get_edgecolor())
            if a.get_hatch() and hasattr(a, "get_hatchcolor"):
                out.append(a.get_hatchcolor())
        elif isinstance(a, Line2D):
            if a.get_linestyle() not in ("None", "none", "", " "):
                out.append(a.get_color())
            if a.get_marker() not in ("None", "none", "", None):
                out += [a.get_markerfacecolor(), a.get_markeredgecolor()]
        elif isinstance(a, Collection):
            out += list(a.get_facecolors())
            widths = list(a.get_linewidths()) or [0]
            edges = list(a.get_edgecolors())
            out += [e for i, e in enumerate(edges) if widths[i % len(widths)] > 0]
    return {c for c in map(_rgb, out) if c}


def _plotted_colours(fig) -> set[str]:
    return _colours(a for ax in fig.axes for a in [*ax.patches, *ax.lines, *ax.collections])


def _legend(fig):
    assert len(fig.legends) == 1, "one legend for the whole figure"
    legend = fig.legends[0]
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles
    return legend, handles


def _fake_rows() -> list[dict]:
    """Two pairs, four teacher kinds, a Bayes-optimal reference and 13 students, three seeds."""
    teachers = ["teacher:ce", "teacher:ls0.1", "teacher:ensemble3", "teacher:self"]
    students = [f"method_{i}" for i in range(13)]
    rows = []
    for p, pair in enumerate(["big->small", "big->tiny"]):
        for seed in range(3):
            models = ([("bayes", "bayes_optimal")] + [("teacher", t) for t in teachers]
                      + [("student", s) for s in students])
            for k, (role, method) in enumerate(models):
                rows.append({"dataset": "toy", "pair": pair, "role": role, "method": method, "seed": seed,
                             "accuracy": 0.6 + 0.02 * k + 0.005 * seed + 0.1 * p, "ece": 0.01 * (k % 7) + 0.002 * seed})
    rows.append({"dataset": "toy", "pair": "big->tiny", "role": "student", "method": "method_0", "seed": 3,
                 "accuracy": None, "ece": float("nan")})  # a failed evaluation is left out, not plotted
    return rows


def test_write_figures_writes_pngs(tiny, tmp_path):
    suite, found, rows, _ = tiny
    out = tmp_path / "figures"
    paths = write_figures(suite, found, rows, out)
    assert sorted(p.name for p in paths) == ["ece_vs_accuracy_gaussian.png", "reliability_gaussian_mlp_32x2_to_linear.png"]
    assert sorted(out.iterdir()) == sorted(paths), "no temporary file left behind"
    for path in paths:
        width, height = _png_size(path)
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (path, width, height)
        assert path.stat().st_size > 10_000
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_ece_accuracy_one_panel_per_pair():
    rows = _fake_rows()
    labels = [f"method_{i}" for i in range(13)]
    fig = ece_accuracy_figure(rows, title="toy", labels=labels)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["big → small", "big → tiny"]
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[1])

    legend, handles = _legend(fig)
    names = [t.get_text() for t in legend.get_texts()]
    refs = ["bayes_optimal", "teacher:ce", "teacher:ls0.1", "teacher:ensemble3", "teacher:self"]
    assert names == refs + labels + ["one seed", "mean over seeds"]
    assert _plotted_colours(fig) <= _colours(handles), "a colour on the plot is missing from the legend"

    styles = {name: (to_hex(h.get_color()), h.get_marker()) for name, h in zip(names, handles)
              if name in refs + labels}
    assert len(set(styles.values())) == len(styles), "two methods share a (colour, marker)"
    assert {styles[t][1] for t in refs[1:]} == {REFERENCE_MARKERS["teacher"]}
    assert styles["bayes_optimal"][1] == REFERENCE_MARKERS["bayes"]
    assert not {styles[r][1] for r in refs} & set(STUDENT_MARKERS)

    # One point per model and seed, plus one mean per model, in each panel.
    for ax in panels:
        sizes = [len(c.get_offsets()) for c in ax.collections]
        assert sum(sizes) == (len(refs) + len(labels)) * 4


def test_method_styles_are_distinct_and_stable():
    series = ([("bayes", "bayes_optimal")] + [("teacher", f"teacher:{k}") for k in ("ce", "ls0.1", "ensemble3", "self")]
              + [("student", f"m{i}") for i in range(40)])
    styles = method_styles(series)
    assert len(styles) == len(series)
    assert len(set(styles.values())) == len(styles)
    assert {c for c, _ in styles.values()} <= set(PALETTE)
    # Neighbours in the legend differ in colour and, among students, in marker too.
    students = [styles[m] for r, m in series if r == "student"]
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(students, students[1:]))
    # A method's style does not depend on which other datasets or pairs are drawn.
    rows = _fake_rows()
    order = legend_order(rows, [f"method_{i}" for i in range(13)])
    full = method_styles(order)
    assert all(full[m] == method_styles(order[: i + 1])[m] for i, (_, m) in enumerate(order))


def test_reliability_has_count_strip_under_each_panel(tiny):
    suite, found, _, _ = tiny
    pair = found[0][0].pair
    pooled = _pooled_bins(found, "gaussian", pair)
    names = [n for n in ["teacher:ce", *suite.labels] if n in pooled]
    assert names == ["teacher:ce", "ce", "kd_T2", "kd_ts"]
    fig = reliability_figure(pooled, names, title="tiny")
    fig.canvas.draw()  # runs the layout, so positions are final
    assert len(fig.axes) == 2 * len(names)
    for k, name in enumerate(names):
        ax, strip = fig.axes[2 * k], fig.axes[2 * k + 1]
        assert ax.get_title().startswith(name + "\nECE ")
        assert strip.get_shared_x_axes().joined(ax, strip)
        assert strip.get_yscale() == "log"
        top, below = ax.get_position(), strip.get_position()
        assert below.y1 <= top.y0 + 1e-6 and abs(below.x0 - top.x0) < 1e-6 and abs(below.x1 - top.x1) < 1e-6
        assert below.height < top.height / 2
        counts = pooled[name][0]
        assert len(strip.patches) == sum(c > 0 for c in counts)
        heights = sorted(p.get_height() for p in strip.patches)
        assert heights == pytest.approx(sorted(c / sum(counts) for c in counts if c > 0))
        assert strip.get_ylim()[0] < heights[0], "the sparsest bin still shows a bar"
    legend, handles = _legend(fig)
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == "accuracy in bin" and "perfect calibration" in labels
    assert any("share of samples" in t for t in labels)
    assert _plotted_colours(fig) <= _colours(handles), "a colour on the plot is missing from the legend"


def test_reliability_title_ece_matches_the_record(tiny):
    """With one seed, the pooled ECE of a panel is the record's own 15-bin ECE."""
    suite, found, _, _ = tiny
    one = [(run, rec) for run, rec in found if run.config.seed == 0]
    pooled = _pooled_bins(one, "gaussian", one[0][0].pair)
    fig = reliability_figure(pooled, ["kd_T2"])
    shown = float(re.search(r"ECE ([0-9.]+)", fig.axes[0].get_title()).group(1))
    record = next(rec for run, rec in one if run.label == "kd_T2")
    assert shown == pytest.approx(record["student/ece"], abs=1.5e-3)


def test_figures_do_not_touch_pyplot(tiny, tmp_path):
    """Drawing leaves no pyplot figure open (runners write tables again and again)."""
    import matplotlib.pyplot as plt

    suite, found, rows, _ = tiny
    before = plt.get_fignums()
    write_figures(suite, found, rows, tmp_path / "f")
    assert plt.get_fignums() == before
    assert os.listdir(tmp_path / "f")
