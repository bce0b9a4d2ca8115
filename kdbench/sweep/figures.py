"""Figures of a suite, drawn from its run records and the rows of ``results.csv``.

* ``ece_vs_accuracy_<dataset>.png``: test ECE against test accuracy, one panel per
  teacher → student pair, one small point per model and seed and a large outlined
  point for the mean over seeds.  Reference models (teachers, a Bayes-optimal
  predictor) are drawn with their own markers.
* ``reliability_<dataset>_<teacher>_to_<student>.png``: one reliability diagram per
  method, per-bin sums pooled over seeds (the sums add, so pooling is exact), with the
  share of test samples in each bin in a strip underneath: a bin far from the diagonal
  that holds a handful of samples weighs almost nothing in the ECE.

Every method keeps one colour and marker across the figures of a suite.  Colours come
from Paul Tol's colour-blind-safe "bright" scheme, whose seven colours are seven
distinct hues; markers change along with colours, so methods past the seventh still
get a (colour, marker) pair of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from kdbench._io import atomic_write
from kdbench.experiments.evaluate import N_BINS, RELIABILITY_FIELDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kdbench.sweep.suite import Run, Suite

# Paul Tol's "bright" qualitative scheme: blue, cyan, green, yellow, red, purple, grey.
PALETTE = ("#4477AA", "#66CCEE", "#228833", "#CCBB44", "#EE6677", "#AA3377", "#BBBBBB")
# Six markers against seven colours: the (colour, marker) pairs repeat only after 42 methods.
STUDENT_MARKERS = ("o", "s", "^", "D", "v", "p")
REFERENCE_MARKERS = {"teacher": "*", "bayes": "X"}
OTHER_REFERENCE_MARKER = "P"
ROLE_RANK = {"bayes": 0, "teacher": 1}  # legend order: references first, students last

ACCURACY_COLOUR = PALETTE[0]
OVER_COLOUR = "#CC3311"  # darker than the palette's red: it is drawn as thin hatching
UNDER_COLOUR = PALETTE[3]
COUNT_COLOUR = "#777777"
DIAGONAL_COLOUR = "#000000"
EDGE_COLOUR = "#000000"

Style = tuple[str, str]  # (colour, marker)


def _new_figure(**kw: Any) -> Figure:
    # A Figure bound to the Agg canvas, not pyplot: nothing global is switched or kept
    # alive, so drawing is safe in a headless runner and in a notebook alike.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def method_styles(series: Iterable[tuple[str, str]]) -> dict[str, Style]:
    """A (colour, marker) per method, from ``(role, method)`` pairs in legend order.

    Reference models (any role but ``"student"``) get the marker of their role and
    students cycle through :data:`STUDENT_MARKERS`; colours cycle through
    :data:`PALETTE` over all methods, so neighbours in the legend differ in both.
    """
    styles: dict[str, Style] = {}
    students = 0
    for role, method in series:
        if method in styles:
            continue
        colour = PALETTE[len(styles) % len(PALETTE)]
        if role == "student":
            marker = STUDENT_MARKERS[students % len(STUDENT_MARKERS)]
            students += 1
        else:
            marker = REFERENCE_MARKERS.get(role, OTHER_REFERENCE_MARKER)
        styles[method] = (colour, marker)
    return styles


def legend_order(rows: Sequence[dict[str, Any]], labels: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(role, method)`` of the rows, references first, students in ``labels`` order."""
    order = {label: i for i, label in enumerate(labels)}
    seen = list(dict.fromkeys((r["role"], r["method"]) for r in rows))
    first = {key: i for i, key in enumerate(seen)}
    return sorted(seen, key=lambda k: (k[0] == "student", ROLE_RANK.get(k[0], len(ROLE_RANK)),
                                       order.get(k[1], len(order)), first[k]))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def _marker_size(marker: str, size: float) -> float:
    # A star fills less of its box than a circle: enlarge it to look as heavy.
    return size * 2.2 if marker == "*" else size


def ece_accuracy_figure(rows: Sequence[dict[str, Any]], *, title: str = "",
                        styles: dict[str, Style] | None = None, labels: Sequence[str] = ()) -> Figure:
    """ECE against accuracy of one dataset's rows: one panel per pair, shared ECE axis.

    ``rows`` are rows of ``results.csv`` (``pair``, ``role``, ``method``, ``accuracy``,
    ``ece``); rows without a finite accuracy and ECE are left out.
    """
    from matplotlib.lines import Line2D

    part = [r for r in rows if _finite(r.get("accuracy")) and _finite(r.get("ece"))]
    pairs = list(dict.fromkeys(r["pair"] for r in part))
    series = legend_order(part, labels)
    if not styles or any(m not in styles for _, m in series):
        styles = method_styles(series)
    cols = max(1, min(len(pairs), 3))
    nrows = max(1, -(-len(pairs) // cols))
    fig = _new_figure(figsize=(3.9 * cols + 2.2, 3.6 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, cols, sharey=True, squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    for k, (ax, pair) in enumerate(zip(axes.flat, pairs)):
        sub = [r for r in part if r["pair"] == pair]
        for role, method in series:
            pts = [r for r in sub if r["role"] == role and r["method"] == method]
            if not pts:
                continue
            colour, marker = styles[method]
            xs, ys = [r["accuracy"] for r in pts], [r["ece"] for r in pts]
            ax.scatter(xs, ys, s=_marker_size(marker, 16), marker=marker, color=colour, alpha=0.55,
                       linewidths=0, zorder=2)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=_marker_size(marker, 70), marker=marker,
                       color=colour, edgecolors=EDGE_COLOUR, linewidths=0.8, zorder=3)
        ax.set_title(pair.replace("->", " → "), fontsize=9)
        ax.set_xlabel("test accuracy", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(f"test ECE ({N_BINS} bins)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
        ax.margins(0.08)
    handles = [Line2D([], [], ls="none", marker=styles[m][1], color=styles[m][0], markeredgecolor=EDGE_COLOUR,
                      markeredgewidth=0.8, markersize=(10 if styles[m][1] == "*" else 7), label=m)
               for _, m in series]
    handles += [
        Line2D([], [], ls="none", marker="o", markerfacecolor="none", markeredgecolor=EDGE_COLOUR,
               markeredgewidth=0.6, markersize=4, label="one seed"),
        Line2D([], [], ls="none", marker="o", markerfacecolor="none", markeredgecolor=EDGE_COLOUR,
               markeredgewidth=0.8, markersize=7, label="mean over seeds"),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False,
               title="model (★: teacher)" if any(r != "student" for r, _ in series) else "model",
               title_fontsize=8, alignment="left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def reliability_figure(pooled: dict[str, Sequence[Sequence[float]]], names: Sequence[str] | None = None, *,
                       title: str = "") -> Figure:
    """Reliability diagrams, one panel per name, each over a strip of its bins' sample shares.

    ``pooled[name]`` is ``(count, conf_sum, correct_sum)`` per equal-width confidence
    bin, summed over seeds.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = [n for n in (names if names is not None else pooled) if n in pooled]
    cols = max(1, min(len(names), 4))
    nrows = max(1, -(-len(names) // cols))
    fig = _new_figure(figsize=(2.9 * cols, 3.5 * nrows + 0.6), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.04)
    outer = fig.add_gridspec(nrows, cols)
    present = {"over": False, "under": False}
    floor = 1.0
    strips = []
    for k, name in enumerate(names):
        count, conf_sum, correct_sum = (list(map(float, s)) for s in pooled[name])
        m = len(count)
        total = sum(count)
        edges = [i / m for i in range(m)]
        full = [i for i in range(m) if count[i] > 0]
        acc = {i: correct_sum[i] / count[i] for i in full}
        conf = {i: conf_sum[i] / count[i] for i in full}
        ece = sum(abs(acc[i] - conf[i]) * count[i] for i in full) / total if total else float("nan")

        inner = outer[k // cols, k % cols].subgridspec(2, 1, height_ratios=(3.2, 1.0), hspace=0.0)
        ax = fig.add_subplot(inner[0])
        strip = fig.add_subplot(inner[1], sharex=ax)
        strips.append(strip)
        ax.bar([edges[i] for i in full], [acc[i] for i in full], width=1 / m, align="edge",
               color=ACCURACY_COLOUR, edgecolor="white", linewidth=0.5, zorder=1)
        for kind, keep, colour in (("over", lambda i: conf[i] > acc[i], OVER_COLOUR),
                                   ("under", lambda i: conf[i] < acc[i], UNDER_COLOUR)):
            gap = [i for i in full if keep(i)]
            if gap:
                present[kind] = True
                # Hatching, not a translucent fill: a fill over an accuracy bar would
                # blend into a colour the legend does not show.  An explicit edge
                # colour is also the hatch colour.
                ax.bar([edges[i] for i in gap], [conf[i] - acc[i] for i in gap], bottom=[acc[i] for i in gap],
                       width=1 / m, align="edge", facecolor="none", edgecolor=colour,
                       hatch="/////", linewidth=0.8, zorder=2)
        ax.plot([0, 1], [0, 1], ls="--", color=DIAGONAL_COLOUR, lw=0.8, zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nECE {ece:.3f} (seeds pooled)", fontsize=8.5)
        ax.tick_params(labelsize=7, labelbottom=False)
        shares = [c / total if total else 0.0 for c in count]
        floor = min([floor, *(s for s in shares if s > 0)])
        strip.bar([edges[i] for i in full], [shares[i] for i in full], width=1 / m, align="edge",
                  color=COUNT_COLOUR, edgecolor="white", linewidth=0.5)
        strip.set_yscale("log")
        strip.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))  # 1e-4 -> 0.01%, not 0%
        strip.yaxis.set_minor_formatter(NullFormatter())
        strip.tick_params(axis="x", labelsize=7)
        strip.tick_params(axis="y", labelsize=6)
        strip.set_xlabel("confidence", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("accuracy", fontsize=8)
            strip.set_ylabel("share", fontsize=7)
        else:
            ax.tick_params(labelleft=False)
            strip.tick_params(labelleft=False)
    # One log range for every strip, from under the sparsest bin (so a one-sample bin
    # still shows a bar) to all the samples: strip heights compare across panels.
    low = min(floor, 0.1) / 3
    for strip in strips:
        strip.set_ylim(low, 1.6)
        # Every other decade: three labels fit the strip's height without touching.
        strip.set_yticks([t for t in (1e-6, 1e-4, 1e-2, 1.0) if t >= low])
    handles = [
        Patch(facecolor=ACCURACY_COLOUR, edgecolor="white", label="accuracy in bin"),
        *([Patch(facecolor="none", edgecolor=OVER_COLOUR, hatch="/////",
                 label="gap: over-confident")] if present["over"] else []),
        *([Patch(facecolor="none", edgecolor=UNDER_COLOUR, hatch="/////",
                 label="gap: under-confident")] if present["under"] else []),
        Line2D([], [], ls="--", color=DIAGONAL_COLOUR, lw=0.8, label="perfect calibration"),
        Patch(facecolor=COUNT_COLOUR, edgecolor="white", label="share of samples in bin (strip, log scale)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _pooled_bins(found: list[tuple[Run, dict[str, Any]]], dataset: str, pair: str) -> dict[str, list[list[float]]]:
    """Per method (and the plain ``teacher:ce`` teacher), the per-bin sums added over seeds."""
    # Imported here: tables imports this module at its top.
    from kdbench.sweep.tables import _teacher_key, _teacher_kind

    pooled: dict[str, list[list[float]]] = {}
    seen: set[str] = set()
    for run, record in found:
        if run.config.dataset != dataset or run.pair != pair:
            continue
        entries = [(run.label, "student")]
        ident = _teacher_key(run)
        if record.get("teacher/bin_count") is not None and _teacher_kind(run) == "teacher:ce" and ident not in seen:
            seen.add(ident)
            entries.append(("teacher:ce", "teacher"))
        for name, role in entries:
            sums = [record.get(f"{role}/{f}") for f in RELIABILITY_FIELDS]
            if any(s is None for s in sums):
                continue
            acc = pooled.setdefault(name, [[0.0] * len(sums[0]) for _ in RELIABILITY_FIELDS])
            for i, s in enumerate(sums):
                acc[i] = [a + b for a, b in zip(acc[i], s)]
    return pooled


def write_figures(suite: Suite, found: list[tuple[Run, dict[str, Any]]], rows: list[dict[str, Any]],
                  out_dir: Path) -> list[Path]:
    """Write the reliability diagrams and ECE-vs-accuracy figures of ``suite``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, path: Path) -> None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        written.append(path)

    styles = method_styles(legend_order(rows, suite.labels))
    for dataset in suite.datasets:
        pairs = list(dict.fromkeys(r.pair for r, _ in found if r.config.dataset == dataset))
        for pair in pairs:
            pooled = _pooled_bins(found, dataset, pair)
            names = [n for n in ["teacher:ce", *suite.labels] if n in pooled]
            if not names:
                continue
            fig = reliability_figure(pooled, names, title=f"{suite.name}: {dataset}, {pair.replace('->', ' → ')}"
                                                          " — reliability per method")
            save(fig, out_dir / f"reliability_{dataset}_{pair.replace('->', '_to_')}.png")

        part = [r for r in rows if r["dataset"] == dataset]
        if not any(_finite(r.get("accuracy")) and _finite(r.get("ece")) for r in part):
            continue
        fig = ece_accuracy_figure(part, title=f"{suite.name}: {dataset} — ECE vs accuracy", styles=styles,
                                  labels=suite.labels)
        save(fig, out_dir / f"ece_vs_accuracy_{dataset}.png")
    return written
