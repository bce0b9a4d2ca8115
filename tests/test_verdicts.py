"""Claims, paired intervals and verdicts; the Δ-vs-ce columns; the generated narrative of results/README.md."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from kdbench.sweep import load_suite, resolve_suite
from kdbench.sweep.store import load_records
from kdbench.sweep.tables import model_rows, write_tables
from kdbench.sweep.verdicts import (
    CLAIMS,
    decide,
    evaluate_claims,
    narrative_block,
    narrative_markdown,
    paired_interval,
    summary_lines,
    update_narrative,
)

ROOT = Path(__file__).resolve().parents[1]


def test_paired_interval_matches_the_t_formula():
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) · sd 1 / sqrt(3)
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)


def test_paired_interval_agrees_with_scipy():
    from scipy import stats

    rng = random.Random(3)
    d = [rng.gauss(0.1, 0.2) for _ in range(7)]
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    _, low, high = paired_interval(d)
    assert (low, high) == pytest.approx((ci.low, ci.high))


@pytest.mark.parametrize("low,high,direction,expected", [
    (-0.3, -0.1, -1, "supported"), (0.1, 0.3, -1, "contradicted"), (-0.1, 0.1, -1, "inconclusive"),
    (0.1, 0.3, +1, "supported"), (-0.3, -0.1, +1, "contradicted"), (-0.1, 0.1, +1, "inconclusive"),
])
def test_decide(low, high, direction, expected):
    assert decide(low, high, direction) == expected


def _rows(ece_gap: float, noise: float, seeds: int = 5, labels=("ce", "kd", "kd_ts")) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for seed in range(seeds):
        base = rng.uniform(0.05, 0.1)  # shared by every method at this seed: the pairing removes it
        for i, label in enumerate(labels):
            ece = base + (ece_gap if label != "ce" else 0.0) + rng.gauss(0, noise)
            rows.append({"dataset": "d", "pair": "t->s", "role": "student", "method": label, "seed": seed,
                         "ece": ece, "ece_ts": ece - 0.02 + rng.gauss(0, noise), "accuracy": 0.9,
                         "agreement": 0.9 + rng.gauss(0, 0.01), "true_ce": 0.01 * (i + 1) + rng.gauss(0, 1e-4),
                         "conformal_coverage_90": 0.9, "selective_accuracy_95": 0.95})
    return rows


METHODS = {"ce": "ce", "kd": "kd", "kd_ts": "kd_ts"}


def _verdict(rows, key, compared_part=""):
    (v,) = [v for v in evaluate_claims(rows, METHODS) if v.claim.key == key and compared_part in v.compared]
    return v


def test_a_consistent_gap_is_supported_and_its_reverse_contradicted():
    assert _verdict(_rows(-0.03, 0.002), "kd_lowers_ece").verdict == "supported"
    assert _verdict(_rows(+0.03, 0.002), "kd_lowers_ece").verdict == "contradicted"
    noisy = _verdict(_rows(-0.003, 0.03), "kd_lowers_ece")
    assert noisy.verdict == "inconclusive" and noisy.low < 0 < noisy.high
    assert noisy.n == 5 and noisy.compared == "ece: kd − ce"


def test_within_below_and_rank_claims():
    rows = _rows(-0.03, 0.002)
    assert _verdict(rows, "ts_lowers_ece").verdict == "supported"  # ece_ts is 0.02 below ece
    assert _verdict(rows, "agreement_below_one").verdict == "supported"  # 0.9 < 0.99
    rank = _verdict(rows, "binned_ece_ranks_like_true")
    assert rank.n == 5 and -1 <= rank.low <= rank.mean <= rank.high <= 1


def test_identical_methods_have_an_interval_of_zero():
    rows = _rows(0.0, 0.0)
    v = _verdict(rows, "kd_raises_accuracy")
    assert (v.mean, v.low, v.high, v.verdict) == (0.0, 0.0, 0.0, "inconclusive")


def test_a_claim_is_tested_for_every_label_of_its_method():
    rows = _rows(-0.03, 0.002, labels=("ce", "kd_T2", "kd_T4"))
    verdicts = evaluate_claims(rows, {"ce": "ce", "kd_T2": "kd", "kd_T4": "kd"})
    compared = [v.compared for v in verdicts if v.claim.key == "kd_lowers_ece"]
    assert compared == ["ece: kd_T2 − ce", "ece: kd_T4 − ce"]


def test_claims_of_methods_a_suite_lacks_are_left_out():
    rows = [r for r in _rows(-0.03, 0.002) if r["method"] == "ce"]
    keys = {v.claim.key for v in evaluate_claims(rows, METHODS)}
    assert keys == {"ts_lowers_ece"}


def test_one_seed_gives_no_verdict():
    assert evaluate_claims(_rows(-0.03, 0.002, seeds=1), METHODS) == []


def test_claims_are_data_with_unique_keys():
    assert len({c.key for c in CLAIMS}) == len(CLAIMS)
    assert {c.kind for c in CLAIMS} <= {"paired", "within", "below", "rank"}


def test_summary_has_at_most_five_lines_and_only_decided_claims():
    lines = summary_lines(evaluate_claims(_rows(-0.03, 0.002), METHODS))
    assert 1 <= len(lines) <= 5 and all("supported" in x or "contradicted" in x for x in lines)


def test_narrative_block_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nprose\n<!-- claims:s:begin -->\nold\n<!-- claims:s:end -->\nmore prose\n")
    verdicts = evaluate_claims(_rows(-0.03, 0.002), METHODS)
    assert update_narrative(readme, "s", verdicts)
    text = readme.read_text()
    assert "old" not in text and text.startswith("# Results\n\nprose\n") and text.endswith("more prose\n")
    assert narrative_block(text, "s") == narrative_markdown("s", verdicts)
    assert not update_narrative(readme, "other", verdicts)  # no markers: untouched


@pytest.mark.parametrize("suite_name", ["quick", "paper", "lm-paper"])
def test_results_readme_narrative_matches_the_committed_records(suite_name):
    # The prose in results/README.md cannot contradict the tables: its claims block is generated from them.
    text = (ROOT / "results" / "README.md").read_text()
    block = narrative_block(text, suite_name)
    assert block is not None, f"results/README.md has no generated claims block for {suite_name}"
    suite = load_suite(resolve_suite(suite_name))
    found, _ = load_records(ROOT / "results" / suite_name / "runs", suite.runs)
    verdicts = evaluate_claims(model_rows(found), {r.label: r.config.method for r in suite.runs})
    assert block == narrative_markdown(suite_name, verdicts)


@pytest.mark.parametrize("suite_name", ["quick", "paper", "lm-paper"])
def test_committed_claims_and_tables_are_those_of_the_committed_records(suite_name, tmp_path):
    suite = load_suite(resolve_suite(suite_name))
    src = ROOT / "results" / suite_name
    (tmp_path / suite_name / "runs").mkdir(parents=True)
    for p in (src / "runs").glob("*.json"):
        (tmp_path / suite_name / "runs" / p.name).write_bytes(p.read_bytes())
    write_tables(suite, tmp_path, figures=False)
    for name in ("table.md", "claims.md", "claims.csv", "results.csv"):
        assert (tmp_path / suite_name / name).read_text() == (src / name).read_text(), name


def test_table_starts_with_verdicts_and_has_delta_columns_and_marks_the_best():
    from kdbench.sweep.tables import markdown_tables

    suite = load_suite(ROOT / "tests" / "data" / "tiny_suite.toml")
    pair = suite.runs[0].pair
    rows = _rows(-0.03, 0.002, labels=("ce", "kd_T2", "kd_ts"))
    for r in rows:
        r.update(dataset="gaussian", pair=pair, teacher="mlp_32x2", student="linear", nll=0.5, brier=0.2,
                 adaptive_ece=r["ece"], aurc=0.01, true_ce_ts=0.01)
        r["accuracy"] = 0.8 + (0.05 if r["method"] == "kd_ts" else 0.0) + 0.001 * r["seed"]
    methods = {run.label: run.config.method for run in suite.runs}
    text = markdown_tables(suite, rows, 0, evaluate_claims(rows, methods))
    lines = text.splitlines()
    assert lines[0] == "# Suite `tiny`" and lines[4].startswith("- ")  # verdicts come first
    assert sum(line.startswith("- ") for line in lines[:12]) <= 5
    header = next(line for line in lines if line.startswith("| teacher"))
    assert "ΔAcc vs ce" in header and "ΔNLL vs ce" in header and "ΔECE vs ce" in header
    kd_ts = next(line for line in lines if "| kd_ts " in line)
    cells = [c.strip() for c in kd_ts.strip("|").split("|")]
    assert cells[4].startswith("**0.8")  # the best accuracy, bold
    assert cells[-3].startswith("+0.050 [+0.050, +0.050]")  # Δ accuracy vs ce, same seed
    ce = next(line for line in lines if "| ce " in line)
    assert [c.strip() for c in ce.strip("|").split("|")][-3:] == ["–", "–", "–"]
