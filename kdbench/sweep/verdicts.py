"""Claims from the literature, tested on a suite's records: a verdict with a 95% interval each.

Every claim compares, for one dataset and teacher -> student pair, a metric of one
method's students with the same metric of a baseline method's students *at the same
seed* (the same data split, initialisation stream and teacher), so the seed-to-seed
spread that both share cancels.  With d_s the difference at seed s over the n seeds
where both ran:

    mean = (1/n) sum_s d_s,   95% interval = mean ± t_{0.975, n-1} · sd(d) / sqrt(n)   (paired t)

The verdict is *supported* when the interval lies on the side the claim predicts,
*contradicted* when it lies on the other side, and *inconclusive* when it covers 0
(or, for a threshold claim, the threshold).  The t interval assumes the differences are
roughly normal; with 3 to 5 seeds it is wide, which is the honest answer.

The rank claim (datasets with a known posterior) correlates, over the methods, the
seed-mean binned ECE with the seed-mean true calibration error (Spearman's rho), with a
95% percentile bootstrap over seeds (2000 resamples, fixed seed).

A claim names methods (``kd``), not labels: in a suite with two ``kd`` variants (``kd_T2``
and ``kd_T4``) it is tested for each (a claim between two KD variants, ``same``, pairs only
the variants with the same temperature and alpha).  Claims whose methods or metrics a suite
lacks (``true_kl`` exists on the language datasets only) are left out.
To add a claim, append a :class:`Claim` to :data:`CLAIMS`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench._io import atomic_write_text

LEVEL = 0.95
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Claim:
    """One claim: ``metric`` of ``method`` against ``baseline_metric`` of ``baseline``.

    ``direction`` is +1 when the claim predicts a larger value (after minus before), -1
    a smaller one.  ``kind``: "paired" (method vs baseline at the same seed),
    "within" (two metrics of the same students, e.g. ECE after vs before temperature
    scaling), "below" (the mean of ``metric`` lies below ``threshold``), "rank" (binned
    ECE ranks methods as the true calibration error does: rho above ``threshold``).
    """

    key: str
    source: str
    statement: str
    kind: str
    metric: str
    method: str = ""
    baseline: str = ""
    baseline_metric: str = ""
    direction: int = -1
    threshold: float = 0.0
    same: tuple[str, ...] = ()  # config fields both sides must share (paired claims between two KD variants)


CLAIMS: tuple[Claim, ...] = (
    Claim("kd_lowers_ece", "kdbench's question", "distillation lowers the student's ECE",
          "paired", "ece", method="kd", baseline="ce", direction=-1),
    Claim("kd_raises_coverage", "kdbench's question", "distillation raises conformal coverage at 90%",
          "paired", "conformal_coverage_90", method="kd", baseline="ce", direction=+1),
    Claim("kd_raises_selective_accuracy", "kdbench's question",
          "distillation raises selective accuracy at 95% coverage",
          "paired", "selective_accuracy_95", method="kd", baseline="ce", direction=+1),
    Claim("kd_raises_accuracy", "Hinton et al. (2015)", "KD raises the student's accuracy over CE",
          "paired", "accuracy", method="kd", baseline="ce", direction=+1),
    Claim("ts_lowers_ece", "Guo et al. (2017)", "temperature scaling lowers the ECE of a CE-trained student",
          "within", "ece_ts", method="ce", baseline_metric="ece", direction=-1),
    Claim("ls_teacher_distils_worse", "Müller et al. (2019)",
          "a label-smoothed teacher distils a less accurate student than a plain one",
          "paired", "accuracy", method="kd_ls_teacher", baseline="kd", direction=-1),
    Claim("ts_teacher_calibrates", "Yang & Song (2021); Menon et al. (2021)",
          "a temperature-scaled teacher gives a better-calibrated student",
          "paired", "ece", method="kd_ts", baseline="kd", direction=-1),
    Claim("agreement_below_one", "Stanton et al. (2021)",
          "student-teacher top-1 agreement stays well below 1 (below 0.99)",
          "below", "agreement", method="kd", threshold=0.99),
    Claim("kd_lowers_true_ce", "kdbench's question, on data with a known posterior",
          "distillation lowers the student's calibration error against the true posterior",
          "paired", "true_ce", method="kd", baseline="ce", direction=-1),
    Claim("kd_lowers_true_kl", "Menon et al. (2021)",
          "distillation brings the student's distribution closer to the true one than CE (KL(truth ‖ student))",
          "paired", "true_kl", method="kd", baseline="ce", direction=-1),
    Claim("oracle_beats_teacher", "Menon et al. (2021)",
          "KD from the true distribution gives a student closer to the truth than KD from a trained teacher "
          "(same T and alpha)",
          "paired", "true_kl", method="oracle_kd", baseline="kd", direction=-1, same=("temperature", "alpha")),
    Claim("reverse_beats_forward", "Gu et al. (2024), MiniLLM",
          "reverse KL gives a student closer to the truth than forward KL (same T and alpha)",
          "paired", "true_kl", method="kd_reverse", baseline="kd", direction=-1, same=("temperature", "alpha")),
    Claim("jsd_beats_forward", "Agarwal et al. (2024), GKD",
          "JSD gives a student closer to the truth than forward KL (same T and alpha)",
          "paired", "true_kl", method="kd_jsd", baseline="kd", direction=-1, same=("temperature", "alpha")),
    Claim("binned_ece_ranks_like_true", "on data with a known posterior",
          "the binned ECE ranks the methods as the true calibration error does (Spearman rho > 0.5)",
          "rank", "ece", baseline_metric="true_ce", threshold=0.5, direction=+1),
)

VERDICTS = ("supported", "contradicted", "inconclusive")
CLAIM_COLUMNS = ["dataset", "pair", "claim", "source", "statement", "compared", "estimate", "ci_low", "ci_high",
                 "seeds", "verdict"]


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    dataset: str
    pair: str
    compared: str  # what is compared, in words
    mean: float  # mean paired difference (rank: rho; below: mean of the metric)
    low: float
    high: float
    n: int  # seeds
    verdict: str

    def as_row(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "pair": self.pair, "claim": self.claim.key, "source": self.claim.source,
            "statement": self.claim.statement, "compared": self.compared, "estimate": self.mean,
            "ci_low": self.low, "ci_high": self.high, "seeds": self.n, "verdict": self.verdict,
        }


def t_quantile(df: int, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def paired_interval(diffs: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the paired-t interval of the mean of ``diffs`` (n >= 2)."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def decide(low: float, high: float, direction: int, at: float = 0.0) -> str:
    """The verdict of an interval against ``at``, for a claim that predicts ``direction``."""
    if (direction > 0 and low > at) or (direction < 0 and high < at):
        return "supported"
    if (direction > 0 and high < at) or (direction < 0 and low > at):
        return "contradicted"
    return "inconclusive"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy import stats

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def evaluate_claims(rows: list[dict[str, Any]], methods: dict[str, str]) -> list[Verdict]:
    """Every claim that the rows can test, per dataset and pair, in :data:`CLAIMS` order.

    Args:
        rows: model rows (:func:`kdbench.sweep.tables.model_rows`): dataset, pair, role,
            method (the suite's label), seed and the metrics.
        methods: suite label -> method name (``kd_T2`` -> ``kd``).
    """
    # (dataset, pair) -> label -> seed -> row
    students: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["role"] == "student":
            students[(row["dataset"], row["pair"])][row["method"]][row["seed"]] = row
    out: list[Verdict] = []
    for claim in CLAIMS:
        for (dataset, pair), by_label in students.items():
            out += _claim_verdicts(claim, dataset, pair, by_label, methods)
    return out


def _labels(methods: dict[str, str], by_label: dict[str, Any], method: str) -> list[str]:
    return [label for label in by_label if methods.get(label) == method]


def _claim_verdicts(claim: Claim, dataset: str, pair: str, by_label: dict[str, dict[int, dict[str, Any]]],
                    methods: dict[str, str]) -> list[Verdict]:
    out = []
    if claim.kind == "rank":
        return _rank_verdict(claim, dataset, pair, by_label)
    for label in _labels(methods, by_label, claim.method):
        runs = by_label[label]
        if claim.kind == "below":
            vals = [r[claim.metric] for r in runs.values() if _finite(r.get(claim.metric))]
            if len(vals) < 2:
                continue
            mean, low, high = paired_interval(vals)
            out.append(Verdict(claim, dataset, pair, f"{claim.metric} of {label}", mean, low, high, len(vals),
                               decide(low, high, -1, claim.threshold)))
            continue
        bases = [label] if claim.kind == "within" else _labels(methods, by_label, claim.baseline)
        for base in bases:
            if claim.same and not _same_settings(runs, by_label[base], claim.same):
                continue
            base_metric = claim.baseline_metric or claim.metric
            diffs = []
            for seed, r in runs.items():
                b = by_label[base].get(seed)
                if b is not None and _finite(r.get(claim.metric)) and _finite(b.get(base_metric)):
                    diffs.append(r[claim.metric] - b[base_metric])
            if len(diffs) < 2:
                continue
            mean, low, high = paired_interval(diffs)
            if claim.kind == "within":
                compared = f"{claim.metric} − {base_metric} of {label}"
            else:
                compared = f"{claim.metric}: {label} − {base}"
            out.append(Verdict(claim, dataset, pair, compared, mean, low, high, len(diffs),
                               decide(low, high, claim.direction)))
    return out


def _same_settings(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], fields: tuple[str, ...]) -> bool:
    ra, rb = next(iter(a.values())), next(iter(b.values()))
    return all(ra.get(f) == rb.get(f) for f in fields)


def _rank_verdict(claim: Claim, dataset: str, pair: str,
                  by_label: dict[str, dict[int, dict[str, Any]]]) -> list[Verdict]:
    labels = [lb for lb, runs in by_label.items()
              if any(_finite(r.get(claim.baseline_metric)) for r in runs.values())]
    if len(labels) < 3:
        return []
    seeds = sorted(set.intersection(*(set(by_label[lb]) for lb in labels)))
    if len(seeds) < 2:
        return []

    def rho(sample: list[int]) -> float:
        binned = [sum(by_label[lb][s][claim.metric] for s in sample) / len(sample) for lb in labels]
        true = [sum(by_label[lb][s][claim.baseline_metric] for s in sample) / len(sample) for lb in labels]
        return _spearman(binned, true)

    est = rho(seeds)
    rng = random.Random(0)
    boots = sorted(r for r in (rho([rng.choice(seeds) for _ in seeds]) for _ in range(BOOTSTRAP))
                   if not math.isnan(r))
    if math.isnan(est) or not boots:
        return []
    low = boots[int((1 - LEVEL) / 2 * len(boots))]
    high = boots[min(len(boots) - 1, int((1 + LEVEL) / 2 * len(boots)))]
    compared = f"Spearman rho over {len(labels)} methods: {claim.metric} vs {claim.baseline_metric}"
    return [Verdict(claim, dataset, pair, compared, est, low, high, len(seeds),
                    decide(low, high, claim.direction, claim.threshold))]


def fmt_interval(mean: float, low: float, high: float, digits: int = 4) -> str:
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def claims_markdown(suite_name: str, verdicts: list[Verdict]) -> str:
    """``claims.md``: the method, then one row per claim, dataset and pair."""
    from tabulate import tabulate

    counts = {v: sum(x.verdict == v for x in verdicts) for v in VERDICTS}
    out = [
        f"# Claims tested on suite `{suite_name}`",
        "",
        "Each row compares, for one dataset and teacher → student pair, a metric of one method's students with the "
        "same metric of a baseline's students at the same seed. *Estimate* is the mean paired difference over the "
        "seeds where both ran (after − before), with its 95% paired-t interval, mean ± t(0.975, n − 1) · sd / √n. "
        "*supported*: the interval lies on the side the claim predicts; *contradicted*: on the other side; "
        "*inconclusive*: it covers 0. A \"below\" claim tests the mean itself against its threshold; the rank claim "
        "gives Spearman's rho over the methods of the seed-mean binned ECE and true calibration error, with a 95% "
        f"percentile bootstrap over seeds ({BOOTSTRAP} resamples), and needs rho > 0.5. Claims and rules: "
        "`kdbench/sweep/verdicts.py`; regenerate with `kdbench table " + suite_name + " --results-dir results`.",
        "",
        f"{len(verdicts)} rows: {counts['supported']} supported, {counts['contradicted']} contradicted, "
        f"{counts['inconclusive']} inconclusive.",
        "",
    ]
    body = [[v.claim.source, v.claim.statement, v.dataset, v.pair.replace("->", " → "), v.compared,
             fmt_interval(v.mean, v.low, v.high), v.n, f"**{v.verdict}**" if v.verdict != "inconclusive" else v.verdict]
            for v in verdicts]
    out.append(tabulate(body, headers=["source", "claim", "dataset", "teacher → student", "compared",
                                       "estimate [95% CI]", "seeds", "verdict"],
                        tablefmt="pipe", disable_numparse=True))
    return "\n".join(out) + "\n"


def summary_lines(verdicts: list[Verdict], limit: int = 5) -> list[str]:
    """Up to ``limit`` lines, one per claim that has a decided verdict, most decided first."""
    by_claim: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_claim[v.claim.key].append(v)
    lines = []
    for key, vs in by_claim.items():
        counts = {name: sum(v.verdict == name for v in vs) for name in VERDICTS}
        decided = counts["supported"] + counts["contradicted"]
        if not decided:
            continue
        parts = [f"{counts[name]} {name}" for name in VERDICTS if counts[name]]
        claim = vs[0].claim
        lines.append((decided, f"- {claim.source}, {claim.statement}: {', '.join(parts)} of {len(vs)} comparisons."))
    lines.sort(key=lambda x: -x[0])
    return [text for _, text in lines[:limit]]


def narrative_markdown(suite_name: str, verdicts: list[Verdict]) -> str:
    """One bullet per claim: its verdict for every dataset and pair, with the estimate and interval."""
    by_claim: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_claim[v.claim.key].append(v)
    out = [f"Generated by `kdbench table {suite_name} --results-dir results` from `{suite_name}/claims.csv`; "
           "do not edit by hand.", ""]
    for vs in by_claim.values():
        claim = vs[0].claim
        parts = []
        for name in VERDICTS:
            these = [v for v in vs if v.verdict == name]
            if these:
                where = "; ".join(f"{v.dataset} {v.pair.replace('->', ' → ')}, {v.compared} "
                                  f"{fmt_interval(v.mean, v.low, v.high, digits=3)}" for v in these)
                parts.append(f"{name} for {where}")
        out.append(f"- **{claim.source}, {claim.statement}**: "
                   + ". ".join(parts[:1] + [p[0].upper() + p[1:] for p in parts[1:]]) + ".")
    return "\n".join(out) + "\n"


def _markers(suite_name: str) -> tuple[str, str]:
    return f"<!-- claims:{suite_name}:begin -->", f"<!-- claims:{suite_name}:end -->"


def narrative_block(readme_text: str, suite_name: str) -> str | None:
    """The text between the suite's claim markers in a README, or None when it has none."""
    begin, end = _markers(suite_name)
    a, b = readme_text.find(begin), readme_text.find(end)
    if a < 0 or b < a:
        return None
    return readme_text[a + len(begin):b].strip("\n") + "\n"


def update_narrative(readme: Path, suite_name: str, verdicts: list[Verdict]) -> bool:
    """Rewrite the generated block of ``suite_name`` in ``readme`` (a results folder's README.md).

    Only a README that carries the suite's markers is touched; returns whether one was.
    """
    if not readme.is_file():
        return False
    text = readme.read_text()
    begin, end = _markers(suite_name)
    if narrative_block(text, suite_name) is None:
        return False
    a, b = text.index(begin) + len(begin), text.index(end)
    new = text[:a] + "\n" + narrative_markdown(suite_name, verdicts) + text[b:]
    if new != text:
        atomic_write_text(readme, new)
    return True
