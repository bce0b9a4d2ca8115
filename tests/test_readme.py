"""The README runs: every Python block is executed, every kdbench command line parses.

A block may leave names to the reader (a teacher, a loader); its harness below
defines them, tiny, and checks what the block promises.  A new Python block without
a harness fails ``test_every_python_block_has_a_harness``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text()) if kind == lang]


def _plain_loop() -> tuple[dict, Callable[[dict], None]]:
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 10), nn.Linear(8, 10)
    loader = [(torch.randn(16, 8), torch.randint(0, 10, (16,))) for _ in range(3)]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = student.weight.detach().clone()

    def check(ns: dict) -> None:
        assert torch.isfinite(ns["loss"]) and ns["loss"].dtype == torch.float32
        assert not torch.equal(student.weight, before)  # the loop trained the student

    return {"student": student, "teacher": teacher, "loader": loader, "opt": opt}, check


def _hf_trainer() -> tuple[dict, Callable[[dict], None]]:
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    def tiny_lm(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(config)

    class Tokens(Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, 64, (16, 12), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            labels = self.ids[i].clone()
            labels[-3:] = -100  # padding
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels}

    def check(ns: dict) -> None:
        import tempfile

        student, teacher = tiny_lm(0), tiny_lm(1)
        before = student.lm_head.weight.detach().clone()
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=4,
                                                  learning_rate=1e-2, logging_steps=1, save_strategy="no",
                                                  report_to=[], use_cpu=True, disable_tqdm=True)
            trainer = ns["DistillTrainer"](model=student, args=args, train_dataset=Tokens(), teacher=teacher)
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 3 and all(0 < x < 100 for x in losses)
        assert not torch.equal(student.lm_head.weight, before)
        # The logged loss is the README's KD loss, not the model's own cross-entropy.
        items = [Tokens()[i] for i in range(4)]
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        student.eval()
        with torch.no_grad():
            ours = trainer.compute_loss(student, dict(batch))
            own = student(**batch).loss
        assert not torch.isclose(ours, own)

    return {}, check


def _calibration() -> tuple[dict, Callable[[dict], None]]:
    def check(ns: dict) -> None:
        assert 0 < ns["scaled"].ece() < ns["stats"].ece()  # temperature scaling helped the over-confident logits
        assert 1.5 < ns["T"] < 2.5  # the labels were drawn at T = 2

    return {}, check


def _calibration_metric() -> tuple[dict, Callable[[dict], None]]:
    pytest.importorskip("torchmetrics")

    def check(ns: dict) -> None:
        ece, val = ns["ece"], ns["val"].compute()
        assert float(ece.n) == 768
        assert set(val) == {f"val_{k}" for k in ("accuracy", "nll", "brier", "ece", "rms_ce", "mce")}
        assert val["val_ece"] == ece.compute()  # the same samples, added in the same order
        assert ns["batch_ece"] != ece.compute()  # forward gave the last batch's value

    return {}, check


# marker (a line unique to the block) -> harness returning (names the block leaves to the reader, check)
HARNESSES: dict[str, Callable[[], tuple[dict, Callable[[dict], None]]]] = {
    "for x, y in loader:": _plain_loop,
    "class DistillTrainer(Trainer):": _hf_trainer,
    "stats = kdbench.calibration_stats(": _calibration,
    "ece = kdbench.CalibrationError(": _calibration_metric,
}


def _harness(block: str) -> str:
    found = [marker for marker in HARNESSES if marker in block]
    assert len(found) == 1, f"README Python block without exactly one harness in tests/test_readme.py:\n{block}"
    return found[0]


def test_every_python_block_has_a_harness():
    found = [_harness(b) for b in blocks("python")]
    assert sorted(found) == sorted(HARNESSES)  # and no harness is left without its block


@pytest.mark.parametrize("marker", list(HARNESSES))
def test_python_block_runs(marker):
    (block,) = [b for b in blocks("python") if marker in b]
    names, check = HARNESSES[marker]()
    ns = {"__name__": "readme", **names}
    exec(compile(block, f"README.md ({marker})", "exec"), ns)
    check(ns)


def _kdbench_argv(line: str) -> list[str] | None:
    """The argv after ``kdbench`` in a command line, or None when it does not call kdbench."""
    words = shlex.split(line, comments=True)
    for i, w in enumerate(words):
        if w == "kdbench" and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1 :]
    return None


def _commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                argv = _kdbench_argv(part)
                if argv is not None:
                    out.append(argv)
    return out


def test_readme_names_kdbench_commands():
    assert {argv[0] for argv in _commands() if argv} >= {"run", "table", "bench"}


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a) or "(none)")
def test_kdbench_command_line_parses(argv):
    from kdbench.__main__ import COMMANDS

    if not argv:  # plain `kdbench run`'s default command
        argv = ["run"]
    assert argv[0] in COMMANDS
    if argv[0] == "bench":
        from kdbench.bench.cli import _parser

        parser = _parser()
    else:
        from kdbench.sweep import cli

        parser = cli.run_parser() if argv[0] == "run" else cli.table_parser()
    parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown flag or a bad value
