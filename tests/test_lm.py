"""Language-model distillation on a synthetic language: datasets, models, the Trainer path, records, suites."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kdbench
from kdbench.experiments import RunConfig, record_rows, run_experiment
from kdbench.experiments.config import Recipe
from kdbench.experiments.datasets import dataset_info, load_dataset
from kdbench.experiments.lm import LM_ROLE_FIELDS, evaluate_lm, lm_logits, train_lm, truth_logits
from kdbench.experiments.lm_data import load_lm_dataset
from kdbench.experiments.models import build_model
from kdbench.sweep import load_suite, resolve_suite

CPU = torch.device("cpu")
SUITES = Path(kdbench.__file__).parent / "suites"


def tiny(**kw) -> RunConfig:
    base = dict(dataset="ginc_v48", teacher="llama_32x1", student="llama_8x1", method="kd", seed=0, temperature=1.0,
                alpha=0.0, dataset_size=160, student_recipe={"steps": 6, "batch_size": 8},
                teacher_recipe={"steps": 8, "batch_size": 8})
    base.update(kw)
    return RunConfig(**base)


# --------------------------------------------------------------------------- data and models


def test_language_dataset_names_parse():
    info = dataset_info("ginc_v4096")
    assert (info.kind, info.num_classes, info.input_shape, info.posterior) == ("lm", 4096, (64,), True)
    assert dataset_info("hmm_v131072").num_classes == 131072


@pytest.mark.parametrize("name", ["hmm_v2", "hmm_v", "ginc_vx", "hmm_v99999999"])
def test_bad_language_dataset_names_name_the_field(name):
    with pytest.raises(ValueError, match=r"^dataset: "):
        RunConfig(dataset=name, student="llama_8x1", method="ce")


def test_splits_are_disjoint_draws_fixed_by_the_seed():
    a = load_dataset("hmm_v64", dataset_size=200, data_seed=3)
    b = load_dataset("hmm_v64", dataset_size=200, data_seed=3)
    c = load_dataset("hmm_v64", dataset_size=200, data_seed=4)
    assert torch.equal(a.tokens_train, b.tokens_train) and torch.equal(a.tokens_test, b.tokens_test)
    assert not torch.equal(a.tokens_train, c.tokens_train)
    assert (len(a.tokens_train), len(a.tokens_val), len(a.tokens_test)) == (162, 18, 20)
    # Independent streams: the splits are not copies of one another.
    assert not torch.equal(a.tokens_train[:20], a.tokens_test)


def test_a_classifier_on_a_language_and_a_language_model_on_images_are_refused():
    with pytest.raises(ValueError, match=r"student: 'mlp' is a classifier; a language dataset needs"):
        RunConfig(dataset="hmm_v64", student="mlp", method="ce")
    with pytest.raises(ValueError, match=r"student: 'llama_8x1' is a causal language model"):
        RunConfig(dataset="gaussian", student="llama_8x1", method="ce")
    with pytest.raises(ValueError, match=r"student: 'llama_7x1': hidden size must be a multiple of 8"):
        RunConfig(dataset="hmm_v64", student="llama_7x1", method="ce")


def test_truth_logits_score_the_next_token():
    data = load_lm_dataset("ginc_v16", dataset_size=40)
    z = truth_logits(data)(data.tokens_test)
    truth = data.truth(data.tokens_test)
    # Position i holds log P(x_{i+1} | x_<=i): the sampled next token always has positive probability.
    picked = z[:, :-1].gather(-1, data.tokens_test[:, 1:, None])
    assert torch.isfinite(picked).all()
    torch.testing.assert_close(z[:, :-1].exp().double(), truth[:, 1:], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- the Trainer path


def _pkl(teacher, student, tokens) -> float:
    t = torch.log_softmax(lm_logits(teacher, tokens).double(), -1)
    s = torch.log_softmax(lm_logits(student, tokens).double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distilling_through_the_trainer_brings_the_student_to_the_teacher():
    """A tiny teacher, trained with CE through Trainer, distilled into a tiny student with KDLoss in
    DistillationTrainer.compute_loss: the student's KL to the teacher falls."""
    data = load_lm_dataset("hmm_v32", dataset_size=200)
    torch.manual_seed(0)
    teacher = build_model("llama_32x1", data.input_shape, data.num_classes)
    train_lm(teacher, data.tokens_train, Recipe("adam", 1e-2, 16, 40, 0.0, 0.9, "constant", "none"), seed=1,
             device=CPU)
    torch.manual_seed(1)
    student = build_model("llama_8x1", data.input_shape, data.num_classes)
    before = _pkl(teacher, student, data.tokens_test)
    kd = kdbench.KDLoss(temperature=2.0, alpha=0.0, ignore_index=-100)
    result = train_lm(student, data.tokens_train, Recipe("adam", 1e-2, 16, 40, 0.0, 0.9, "constant", "none"),
                      seed=2, device=CPU, teacher=lambda inputs: lm_logits(teacher, inputs["input_ids"]), kd=kd)
    after = _pkl(teacher, student, data.tokens_test)
    assert result.backend == "torch" and result.tokens_per_second > 0
    assert after < 0.5 * before, (before, after)


def test_distillation_trainer_rejects_bad_arguments(tmp_path):
    from transformers import TrainingArguments

    from kdbench.hf import DistillationTrainer

    model = build_model("llama_8x1", (8,), 16).hf
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="teacher: kd distils from a teacher"):
        DistillationTrainer(model=model, args=args, kd=kdbench.KDLoss())
    with pytest.raises(ValueError, match="kd: expected ignore_index=-100"):
        DistillationTrainer(model=model, args=args, teacher=model, kd=kdbench.KDLoss(ignore_index=0))
    with pytest.raises(TypeError, match="kd: expected a kdbench.KDLoss"):
        DistillationTrainer(model=model, args=args, teacher=model, kd=torch.nn.KLDivLoss())


# --------------------------------------------------------------------------- records


@pytest.fixture(scope="module")
def lm_records(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {m: run_experiment(tiny(method=m), cache_dir=str(cache), progress=False)
            for m in ("ce", "kd", "kd_reverse", "kd_ts", "oracle_kd", "label_smoothing")}


def test_language_record_has_every_field(lm_records):
    rec = lm_records["kd"]
    rows = record_rows(rec)
    assert [r["role"] for r in rows] == ["bayes", "teacher", "student"]
    student = rows[-1]
    for f in LM_ROLE_FIELDS:
        assert f in student
        assert student[f] is not None and math.isfinite(student[f]), f
    assert rec["loss_backend"] == "torch"
    assert rec["n_train"] + rec["n_val"] + rec["n_test"] == 160
    assert sum(rec["student/bin_count"]) == rec["n_test"] * 63


def test_the_truth_scores_zero_against_itself(lm_records):
    bayes = record_rows(lm_records["ce"])[0]
    assert bayes["method"] == "bayes_optimal"
    assert bayes["true_kl"] == pytest.approx(0.0, abs=1e-6)
    assert bayes["true_ce"] == pytest.approx(0.0, abs=1e-6)
    # The sampled test tokens' NLL under the truth estimates its entropy.
    assert abs(bayes["nll"] - bayes["entropy_floor"]) < 0.15


def test_models_are_scored_against_the_truth(lm_records):
    for method, rec in lm_records.items():
        s = record_rows(rec)[-1]
        assert s["true_kl"] > 0 and s["excess_nll"] == pytest.approx(s["nll"] - s["entropy_floor"])
        assert 0 <= s["true_accuracy"] <= 1 and 0 <= s["true_ce"] <= 1
    assert record_rows(lm_records["oracle_kd"])[-1]["agreement"] is not None  # teacher named: compared


def test_evaluation_chunking_does_not_change_the_numbers():
    data = load_lm_dataset("hmm_v32", dataset_size=120)
    torch.manual_seed(0)
    model = build_model("llama_8x1", data.input_shape, data.num_classes)
    a = evaluate_lm(lambda t: lm_logits(model, t), data, chunk=5)
    b = evaluate_lm(lambda t: lm_logits(model, t), data, chunk=64)
    for k in ("accuracy", "nll", "ece", "true_kl", "true_ce", "entropy_floor"):
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k


# --------------------------------------------------------------------------- suites


@pytest.mark.parametrize("name", ["lm-quick", "lm-paper", "lm-gpu"])
def test_language_suites_validate(name):
    suite = load_suite(resolve_suite(name))
    assert all(dataset_info(d).kind == "lm" for d in suite.datasets)
    assert {"ce", "kd", "kd_reverse", "kd_jsd", "kd_ts", "oracle_kd"} <= {r.config.method for r in suite.runs}


def test_lm_paper_has_the_promised_grid():
    suite = load_suite(resolve_suite("lm-paper"))
    assert len({r.config.seed for r in suite.runs}) >= 3
    assert len({r.pair for r in suite.runs}) >= 2
    for m in ("kd", "kd_reverse", "kd_jsd"):
        settings = {(r.config.temperature, r.config.alpha) for r in suite.runs if r.config.method == m}
        assert len({t for t, _ in settings}) == 2 and {a > 0 for _, a in settings} == {True, False}, m


def shortened(name: str, tmp_path: Path) -> Path:
    """The shipped suite with its recipes and data cut to a few steps and sequences."""
    text = (SUITES / f"{name}.toml").read_text()
    text = re.sub(r"steps = \d+", "steps = 3", text)
    text = re.sub(r"dataset_size = \d+", "dataset_size = 120", text)
    text = re.sub(r"seeds = \[[^\]]*\]", "seeds = [0]", text)
    text = re.sub(r'name = "lm-quick"', 'name = "lm-quick-short"', text)
    path = tmp_path / f"{name}-short.toml"
    path.write_text(text)
    return path


def test_lm_quick_shortened_runs_under_torchrun(tmp_path):
    """The lm-quick grid, shortened, through torchrun on 2 processes: every run recorded, tables written."""
    suite_path = shortened("lm-quick", tmp_path)
    suite = load_suite(suite_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdbench",
           "run", str(suite_path), "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    # Each rank's Trainer trains alone, on purpose: no DDP warning from TrainingArguments.
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in out.stderr
    runs = sorted((tmp_path / "res" / suite.name / "runs").glob("*.json"))
    assert len(runs) == len(suite.runs)
    backends = {json.loads(p.read_text())["record"]["loss_backend"] for p in runs}
    assert backends == {"torch"}
    table = (tmp_path / "res" / suite.name / "table.md").read_text()
    assert "NLL − floor" in table and "bayes_optimal" in table


def test_lm_step_bench_runs_on_cpu(tmp_path):
    from kdbench.bench import lm_step

    out = tmp_path / "step.md"
    assert lm_step.main(["--device", "cpu", "--vocab", "48", "--student", "llama_8x1", "--batch", "2",
                         "--seq-len", "6", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 48 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["eager", "kdbench"]
    assert rows[1].rstrip(" |").endswith("yes")  # kdbench's loss equals eager's
    assert lm_step.main(["--device", "cpu", "--vocab", "1"]) == 2

