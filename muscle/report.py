"""The compare report: OLD -> NEW for each NEW, as a text table, JSON, Markdown and a PNG.

``muscle-eval compare`` is a thin shell over :func:`build_report` and the ``render_*`` /
``write_*`` functions here, so notebooks and other CLIs can produce the same report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muscle import MuscleError
from muscle.flip_stats import (
    BootstrapSpec,
    Interval,
    SignTest,
    Uncertainty,
    uncertainties,
)
from muscle.flips import (
    CompareResult,
    PaperRow,
    paired_columns,
    paper_columns,
    paper_row_from_columns,
    result_from_columns,
)
from muscle.predictions import check_same_task, read_predictions

TESTS_METHOD = "exact two-sided sign test (exact McNemar) on the discordant pairs b, c"


@dataclass(frozen=True)
class Comparison:
    old: str
    new: str
    result: CompareResult
    uncertainty: Uncertainty

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, **self.result.to_dict()}


@dataclass(frozen=True)
class CompareReport:
    task: str | None
    comparisons: list[Comparison]
    paper_row: PaperRow | None  # only when exactly three files: v1, v2, v2c
    labels: dict[str, str]  # file -> short column label
    paper_uncertainty: Uncertainty | None = None  # with paper_row
    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``comparisons`` and ``paper_row`` (point estimates), ``ci`` and ``tests``."""
        pairs = [{"old": c.old, "new": c.new} for c in self.comparisons]
        unc = [c.uncertainty for c in self.comparisons]
        paper = self.paper_uncertainty
        return {
            "comparisons": [c.to_dict() for c in self.comparisons],
            "paper_row": self.paper_row.to_dict() if self.paper_row else None,
            "ci": {
                **self.bootstrap.to_dict(),
                "comparisons": [{**p, **u.ci_dict()} for p, u in zip(pairs, unc, strict=True)],
                "paper_row": paper.ci_dict() if paper else None,
            },
            "tests": {
                "method": TESTS_METHOD,
                "comparisons": [{**p, **u.tests_dict()} for p, u in zip(pairs, unc, strict=True)],
                "paper_row": paper.tests_dict() if paper else None,
            },
        }


def short_labels(paths: Sequence[str]) -> dict[str, str]:
    """File stems as labels (``runs/v1.jsonl`` -> ``v1``), or the paths if stems collide."""
    stems = {p: Path(p).stem for p in paths}
    if len(set(stems.values())) < len(set(paths)):
        return {p: str(p) for p in paths}
    return stems


def build_report(
    old: str,
    news: Sequence[str],
    *,
    intersect: bool = False,
    bootstrap: BootstrapSpec | None = None,
) -> CompareReport:
    """Read the files, check they belong together, compare OLD with each NEW.

    With exactly two NEW files (v1, v2, v2c) the report also has the paper's table row. Every
    comparison gets paired bootstrap intervals and sign tests (``bootstrap``: settings, the
    defaults of :class:`BootstrapSpec` when None); comparisons over the same examples are
    resampled with the same drawn indices.
    """
    spec = bootstrap or BootstrapSpec()
    if not news:
        raise MuscleError("compare needs OLD and at least one NEW predictions file")
    paths = [str(old), *map(str, news)]
    loaded = {p: read_predictions(p) for p in dict.fromkeys(paths)}
    task = check_same_task({p: meta for p, (_, meta) in loaded.items()})
    old_records = loaded[paths[0]][0]
    cols = [paired_columns(old_records, loaded[p][0], intersect=intersect) for p in paths[1:]]
    paper = None
    if len(paths) == 3:
        # Without --intersect all three id sets are equal: the paper row's v1 -> v2 and
        # v1 -> v2c are the two comparisons (and are resampled once, jointly).
        paper = (
            paper_columns(*(loaded[p][0] for p in paths), intersect=True)
            if intersect
            else (cols[0], cols[1])
        )
    unc, row_unc = uncertainties(cols, paper, spec)
    comparisons = [
        Comparison(paths[0], p, result_from_columns(c), u)
        for p, c, u in zip(paths[1:], cols, unc, strict=True)
    ]
    row = paper_row_from_columns(*paper) if paper else None
    return CompareReport(task, comparisons, row, short_labels(paths), row_unc, spec)


# ------------------------------------------------------------------------------ formatting


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_pp(value: float | None, signed: bool = False) -> str:
    """A difference of scores or rates in percentage points."""
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f} pp" if signed else f"{100 * value:.1f} pp"


def fmt_signed_pp(value: float | None) -> str:
    return fmt_pp(value, signed=True)


def fmt_rel(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def fmt_count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def fmt_p(p: float) -> str:
    """A p-value: 3 decimals, or 2 significant digits in scientific notation below 0.001."""
    if p >= 0.001 or p == 0:
        return f"{p:.3f}"
    exponent = math.floor(math.log10(p))
    return f"{p / 10**exponent:.1f}e{exponent}"


def fmt_interval(interval: Interval | None, signed: bool) -> str:
    """``[low, high]`` in the unit of the value beside it (x100: percent or pp)."""
    if interval is None:
        return ""
    spec = "+.1f" if signed else ".1f"
    return f" [{100 * interval.low:{spec}}, {100 * interval.high:{spec}}]"


def fmt_test(test: SignTest | None) -> str:
    return "n/a" if test is None else f"b={test.b} c={test.c} p={fmt_p(test.p)}"


def _with_ci(
    value: Any, fmt: Callable[[Any], str], ci: dict[str, Interval | None], key: str
) -> str:
    """``fmt(value)`` followed by the key's interval when it has one."""
    if value is None or ci.get(key) is None:
        return fmt(value)
    return fmt(value) + fmt_interval(ci[key], signed=fmt is fmt_signed_pp)


# (label, CompareResult field, formatter): the rows of the comparison table.
COMPARE_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("examples (n)", "n", fmt_count),
    ("score OLD", "old_score", fmt_pct),
    ("score NEW", "new_score", fmt_pct),
    ("score NEW − OLD", "score_diff", fmt_signed_pp),
    ("PFR (gain)", "pfr", fmt_pct),
    ("NFR (regression)", "nfr", fmt_pct),
    ("NFR_mc (new wrong, changed)", "nfr_mc", fmt_pct),
    ("smooth PFR (D>0)", "pfr_smooth", fmt_pct),
    ("smooth NFR (D<0)", "nfr_smooth", fmt_pct),
    ("m_g (mean D over D>0)", "m_g", fmt_pp),
    ("m_r (mean |D| over D<0)", "m_r", fmt_pp),
    ("both correct", "both_correct", fmt_count),
    ("gain (wrong -> right)", "gain", fmt_count),
    ("regression (right -> wrong)", "regression", fmt_count),
    ("both wrong", "both_wrong", fmt_count),
]

# (label, Uncertainty.tests key): the sign-test rows under the comparison table.
COMPARE_TEST_ROWS = [
    ("test gain b vs regression c", "flips"),
    ("test D>0 b vs D<0 c", "smooth_flips"),
]

# (label, PaperRow field, formatter): the paper's Tables 3-5, v2c = compatibility model.
PAPER_ROWS: list[tuple[str, str | tuple[str, ...], Callable[[Any], str]]] = [
    ("score v1", "score_v1", fmt_pct),
    ("score v2", "score_v2", fmt_pct),
    ("score v2c", "score_v2c", fmt_pct),
    ("Δscore_c = v2c − v2", "delta_score_c", fmt_signed_pp),
    ("NFR (v1→v2)", "nfr", fmt_pct),
    ("NFR_c (v1→v2c)", "nfr_c", fmt_pct),
    ("ΔNFR_c", "delta_nfr_c", fmt_signed_pp),
    ("Δ%NFR_c", "rel_delta_nfr_c", fmt_rel),
    ("smooth NFR", "nfr_smooth", fmt_pct),
    ("smooth NFR_c", "nfr_smooth_c", fmt_pct),
    ("Δ smooth NFR_c", "delta_nfr_smooth_c", fmt_signed_pp),
    ("Δ% smooth NFR_c", "rel_delta_nfr_smooth_c", fmt_rel),
    ("m_g / m_g_c", ("m_g", "m_g_c"), fmt_pp),
    ("Δm_g_c", "delta_m_g_c", fmt_signed_pp),
    ("m_r / m_r_c", ("m_r", "m_r_c"), fmt_pp),
    ("Δm_r_c", "delta_m_r_c", fmt_signed_pp),
    ("NFR_mc / NFR_mc_c", ("nfr_mc", "nfr_mc_c"), fmt_pct),
    ("PFR / PFR_c", ("pfr", "pfr_c"), fmt_pct),
    ("ΔPFR_c", "delta_pfr_c", fmt_signed_pp),
]

# (label, Uncertainty.tests key) under the paper row; b favours v2c, c favours v2.
PAPER_TEST_ROWS = [
    ("test ΔNFR_c: b avoided, c added", "nfr_c_vs_nfr"),
    ("test Δscore_c: b v2c-only right, c v2-only", "score_c_vs_score"),
    ("test Δ smooth NFR_c: b avoided, c added", "nfr_smooth_c_vs_nfr_smooth"),
    ("test score: b v2c higher, c v2 higher", "score_sign_c_vs_score"),
]

NA_NOTE = (
    "n/a: no `correct` in these predictions (continuous score): "
    "read the smooth metrics, m_g and m_r"
)


def uncertainty_note(spec: BootstrapSpec) -> str:
    return (
        f"[low, high]: {100 * spec.level:g}% paired bootstrap percentile interval "
        f"({spec.resamples} resamples, seed {spec.seed}); "
        "test: exact two-sided sign test (McNemar) on the discordant pairs b, c"
    )


def comparison_label(report: CompareReport, c: Comparison) -> str:
    """``v1 -> v2``: the column header, and how the gate names a comparison."""
    return f"{report.labels[c.old]} -> {report.labels[c.new]}"


def compare_table(report: CompareReport) -> list[list[str]]:
    """Header + rows (metrics as rows, comparisons as columns) as strings."""
    cs = report.comparisons
    header = ["metric", *(comparison_label(report, c) for c in cs)]
    rows = [
        [label, *(_with_ci(getattr(c.result, key), fmt, c.uncertainty.ci, key) for c in cs)]
        for label, key, fmt in COMPARE_ROWS
    ]
    rows += [
        [label, *(fmt_test(c.uncertainty.tests[key]) for c in cs)]
        for label, key in COMPARE_TEST_ROWS
    ]
    return [header, *rows]


def paper_table(row: PaperRow, uncertainty: Uncertainty | None = None) -> list[list[str]]:
    ci = uncertainty.ci if uncertainty else {}
    out = [["paper row", "value"]]
    for label, key, fmt in PAPER_ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        out.append([label, " / ".join(_with_ci(getattr(row, k), fmt, ci, k) for k in keys)])
    if uncertainty:
        out += [[label, fmt_test(uncertainty.tests[key])] for label, key in PAPER_TEST_ROWS]
    return out


def _align(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for r in table:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _has_na(report: CompareReport) -> bool:
    return any(not c.result.has_correct for c in report.comparisons)


def _heading(report: CompareReport) -> list[str]:
    names = ", ".join(f"{label} = {path}" for path, label in report.labels.items())
    return [f"task: {report.task or '(no sidecar)'}", f"files: {names}"]


def render_text(report: CompareReport) -> str:
    """The human report: an aligned table, and the paper's row when there are three files."""
    parts = [*_heading(report), "", _align(compare_table(report))]
    if report.paper_row is not None:
        v1, v2, v2c = report.labels.values() if len(report.labels) == 3 else ("v1", "v2", "v2c")
        parts += [
            "",
            f"Paper table row (v1 = {v1}, v2 = {v2}, v2c = {v2c}; n = {report.paper_row.n}):",
            _align(paper_table(report.paper_row, report.paper_uncertainty)),
        ]
    parts += ["", uncertainty_note(report.bootstrap)]
    if _has_na(report):
        parts.append(NA_NOTE)
    return "\n".join(parts) + "\n"


def _markdown_table(table: list[list[str]]) -> str:
    table = [[cell.replace("|", "\\|") for cell in row] for row in table]
    header, *rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: CompareReport) -> str:
    parts = [
        f"## Compatibility report: {report.task or 'predictions'}",
        "",
        *(f"- `{label}`: `{path}`" for path, label in report.labels.items()),
        "",
        _markdown_table(compare_table(report)),
    ]
    if report.paper_row is not None:
        parts += [
            "",
            "### Paper table row (v1, v2, v2c)",
            "",
            _markdown_table(paper_table(report.paper_row, report.paper_uncertainty)),
        ]
    parts += ["", uncertainty_note(report.bootstrap)]
    if _has_na(report):
        parts += ["", NA_NOTE]
    return "\n".join(parts) + "\n"


def write_text(path: str | Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def write_json(report: CompareReport, path: str | Path) -> None:
    write_text(path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------- plotting

COLORS = {
    "both_correct": "#b7dfb0",
    "gain": "#9ecae1",
    "regression": "#f4a3a0",
    "both_wrong": "#d9d9d9",
}


def _quadrant_panel(ax: Any, result: CompareResult) -> None:
    """Paper Fig. 2 as a 2x2 grid: rows OLD right/wrong, columns NEW right/wrong."""
    cells = [  # (column, row from top, key, label)
        (0, 0, "both_correct", "both correct"),
        (1, 0, "regression", "regression (NF)"),
        (0, 1, "gain", "gain (PF)"),
        (1, 1, "both_wrong", "both wrong"),
    ]
    for col, row, key, label in cells:
        count = getattr(result, key)
        ax.add_patch(_rect(col, 1 - row, COLORS[key]))
        ax.text(
            col + 0.5,
            1.5 - row,
            f"{label}\n{count}\n({100 * count / result.n:.1f}%)",
            ha="center",
            va="center",
            fontsize=10,
        )
    ax.set_xticks([0.5, 1.5], ["NEW right", "NEW wrong"])
    ax.set_yticks([1.5, 0.5], ["OLD right", "OLD wrong"])
    ax.set_title(
        f"NFR {fmt_pct(result.nfr)}   PFR {fmt_pct(result.pfr)}   NFR_mc {fmt_pct(result.nfr_mc)}",
        fontsize=10,
    )
    _square(ax)


def _smooth_panel(ax: Any, result: CompareResult) -> None:
    """For continuous scores: the three signs of D instead of the four quadrants."""
    n_pos = sum(d > 0 for d in result.deltas)
    n_neg = sum(d < 0 for d in result.deltas)
    cells = [
        ("gain (D > 0)", n_pos, COLORS["gain"]),
        ("unchanged (D = 0)", result.n - n_pos - n_neg, COLORS["both_wrong"]),
        ("regression (D < 0)", n_neg, COLORS["regression"]),
    ]
    for i, (label, count, color) in enumerate(cells):
        ax.add_patch(_rect(0, 2 - i, color, width=2))
        ax.text(
            1,
            2.5 - i,
            f"{label}: {count} ({100 * count / result.n:.1f}%)",
            ha="center",
            va="center",
            fontsize=10,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("no right/wrong: signs of D", fontsize=10)
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 3)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _rect(x: float, y: float, color: str, width: float = 1.0) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, 1, facecolor=color, edgecolor="white", linewidth=3)


def _square(ax: Any) -> None:
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 2)
    ax.set_aspect("equal")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


HIST_COLORS = {"neg": "#d6604d", "zero": "#969696", "pos": "#4393c3"}


def _delta_panel(ax: Any, result: CompareResult) -> None:
    """Histogram of D: regressions red, gains blue, and exact ties (D = 0) as their own grey bar
    so that tiny changes are not hidden among identical outputs."""
    from matplotlib.ticker import MaxNLocator

    deltas = result.deltas
    neg = [d for d in deltas if d < 0]
    pos = [d for d in deltas if d > 0]
    n_zero = len(deltas) - len(neg) - len(pos)
    if all(d in (-1.0, 0.0, 1.0) for d in deltas):  # right/wrong scores: three bars
        ax.bar(
            [-1, 0, 1],
            [len(neg), n_zero, len(pos)],
            width=0.9,
            color=[HIST_COLORS["neg"], HIST_COLORS["zero"], HIST_COLORS["pos"]],
        )
        ax.set_xticks([-1, 0, 1], ["−1\n(regression)", "0\n(unchanged)", "+1\n(gain)"])
    else:
        reach = max(abs(d) for d in deltas)
        nbins = 20  # per side
        ax.hist(
            neg,
            bins=[-reach + i * reach / nbins for i in range(nbins + 1)],
            color=HIST_COLORS["neg"],
            edgecolor="white",
            linewidth=0.5,
        )
        ax.hist(
            pos,
            bins=[i * reach / nbins for i in range(nbins + 1)],
            color=HIST_COLORS["pos"],
            edgecolor="white",
            linewidth=0.5,
        )
        ax.bar(
            [0],
            [n_zero],
            width=reach / nbins / 2,
            color=HIST_COLORS["zero"],
            label=f"D = 0 exactly: {n_zero}",
        )
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlim(-reach * 1.05, reach * 1.05)
        ax.legend(frameon=False, fontsize=9, loc="upper left")
    ax.set_xlabel("D = score(NEW) − score(OLD)")
    ax.set_ylabel("examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(
        f"smooth NFR {fmt_pct(result.nfr_smooth)}   smooth PFR {fmt_pct(result.pfr_smooth)}\n"
        f"m_r {fmt_pp(result.m_r)}   m_g {fmt_pp(result.m_g)}",
        fontsize=10,
    )
    ax.spines[["top", "right"]].set_visible(False)


def write_plot(report: CompareReport, path: str | Path) -> None:
    """PNG: per comparison, the quadrant panel and the histogram of D."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = len(report.comparisons)
    fig, axes = plt.subplots(
        rows, 2, figsize=(11, 4.2 * rows), squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]}
    )
    for (quad_ax, hist_ax), c in zip(axes, report.comparisons, strict=True):
        if c.result.has_correct:
            _quadrant_panel(quad_ax, c.result)
        else:
            _smooth_panel(quad_ax, c.result)
        quad_ax.set_ylabel(comparison_label(report, c), fontsize=11, fontweight="bold", labelpad=12)
        _delta_panel(hist_ax, c.result)
    title = f"Update compatibility — {report.task}" if report.task else "Update compatibility"
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
