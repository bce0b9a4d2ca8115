"""Model zoo: every family's forward shape, published sizes, name parsing."""

from __future__ import annotations

import pytest
import torch

from kdbench.experiments.models import build_model, count_parameters, parse_model

# (name, input shape, classes): tiny inputs, forward shape only.
FORWARD_CASES = [
    ("linear", (40,), 10),
    ("mlp", (40,), 10),
    ("mlp_16x3", (1, 8, 8), 7),
    ("mlp_8x0", (5,), 3),
    ("cnn1d", (40,), 10),
    ("cnn1d", (1, 40), 10),
    ("cnn1d_8", (12,), 4),
    ("cnn2d", (1, 8, 8), 10),
    ("cnn2d_4", (3, 5, 7), 2),
    ("resnet20", (3, 8, 8), 100),
    ("resnet56", (3, 8, 8), 10),
    ("resnet8x4", (3, 8, 8), 100),
    ("resnet32x4", (3, 8, 8), 100),
    ("resnet8", (1, 6, 6), 10),
    ("wrn_40_2", (3, 8, 8), 100),
    ("wrn_16_2", (3, 8, 8), 100),
    ("wrn_10_1", (1, 9, 9), 5),
]


@pytest.mark.parametrize("name,shape,classes", FORWARD_CASES, ids=[f"{c[0]}-{c[1]}" for c in FORWARD_CASES])
def test_forward_shape(name: str, shape: tuple[int, ...], classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_forward_backward_in_train_mode() -> None:
    model = build_model("resnet8", (3, 8, 8), 10)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mnist1d_cnn_has_the_published_size() -> None:
    # Greydanus (2020)'s reference notebook reports 5,210 parameters.
    assert count_parameters(build_model("cnn1d", (40,), 10)) == 5210


# Parameter counts of the CIFAR-100 models as RepDistiller's model zoo reports them (millions).
PUBLISHED_MILLIONS = {"resnet20": 0.28, "resnet56": 0.86, "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26,
                      "wrn_16_2": 0.70}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_cifar_models_have_the_published_size(name: str) -> None:
    n = count_parameters(build_model(name, (3, 32, 32), 100))
    assert n / 1e6 == pytest.approx(PUBLISHED_MILLIONS[name], abs=0.01)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(4)
    a = build_model("cnn2d", (1, 8, 8), 10)
    torch.manual_seed(4)
    b = build_model("cnn2d", (1, 8, 8), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_parse_defaults() -> None:
    assert parse_model("mlp").args == () and parse_model("mlp_64x3").args == (64, 3)
    assert parse_model("resnet32x4").family == "resnetx4" and parse_model("resnet32").family == "resnet"


@pytest.mark.parametrize(
    "name,match",
    [
        ("vgg8", "unknown model"),
        ("mlp_0x2", "widths"),
        ("resnet21", "6n \\+ 2"),
        ("resnet2", "6n \\+ 2"),
        ("wrn_41_2", "6n \\+ 4"),
        ("wrn_40_0", "width k"),
        ("MLP", "unknown model"),
    ],
)
def test_bad_names(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=rf"^student: .*{match}"):
        parse_model(name, field="student")


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match=r"^model: "):
        parse_model(56)


@pytest.mark.parametrize("name,shape", [("cnn1d", (1, 8, 8)), ("resnet20", (40,)), ("cnn2d", (40,))])
def test_wrong_input_kind(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"^model: .*takes"):
        build_model(name, shape, 10)
