"""Model zoo: a registry of architectures by name.

Names (``W``, ``D``, ``C``, ``k`` are integers):

* ``linear`` - logistic regression on the flattened input.
* ``mlp`` = ``mlp_100x2`` (MNIST-1D's published MLP); ``mlp_WxD``: D hidden layers of width W, ReLU.
* ``cnn1d`` = ``cnn1d_25``: MNIST-1D's published CNN (Greydanus 2020): three Conv1d
  (kernel 5/3/3, stride 2, padding 1, C channels, ReLU) and a linear head; 5,210 parameters
  at C = 25 on length-40 input.  Input ``(L,)`` or ``(1, L)``.
* ``cnn2d`` = ``cnn2d_32``: a small image CNN for digits / MNIST: conv3x3(C), conv3x3(C),
  maxpool, conv3x3(2C), maxpool, adaptive avgpool to 2x2, linear.
* ``resnetD`` (D = 6n + 2: resnet8/14/20/32/44/56/110) and ``resnetDx4``: the CIFAR ResNets of
  the KD benchmarks (RepDistiller): basic blocks, stage widths 16/32/64 (x4: 64/128/256 after
  a 32-channel stem), 1x1-conv shortcuts when the shape changes.
* ``wrn_D_k`` (D = 6n + 4): wide ResNet (Zagoruyko & Komodakis), pre-activation blocks,
  widths 16k/32k/64k: ``wrn_40_2``, ``wrn_16_2``, ...
* ``llama_HxD``: a Hugging Face ``LlamaForCausalLM`` of hidden size H and D layers, built from
  a config with random weights (:func:`llama_config`), for the language datasets only
  (``hmm_v<V>``, ``ginc_v<V>``): input ``(L,)`` token ids, output ``(L, V)`` logits.

The usual KD pairs are resnet56 -> resnet20, resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2.
Every builder takes ``(input_shape, num_classes)``; inputs are ``(N, *input_shape)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    pattern: str  # full-match regex over the name; groups are integer arguments
    input_kind: str  # "any" (flattened), "sequence" (input_shape (L,) or (1, L)), "image" ((C, H, W))
    build: Callable[..., nn.Module]
    example: str


# --------------------------------------------------------------------------- MLP / linear


class MLP(nn.Module):
    """Flatten, ``depth`` x (Linear(width) + ReLU), Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 100, depth: int = 2) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, width, depth)


# --------------------------------------------------------------------------- 1-D CNN


class CNN1d(nn.Module):
    """MNIST-1D's ConvBase: (N, L) -> 3 strided Conv1d + ReLU -> flatten -> Linear."""

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        if out < 1:
            raise ValueError(f"input_shape: cnn1d needs sequences of length >= 4, got {length}")
        self.linear = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def _cnn1d(input_shape: tuple[int, ...], num_classes: int, channels: int = 25) -> nn.Module:
    return CNN1d(input_shape[-1], num_classes, channels)


# --------------------------------------------------------------------------- 2-D CNN


def _cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    c = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 4, num_classes),
    )


# --------------------------------------------------------------------------- CIFAR ResNet


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x)).relu()
        h = self.bn2(self.conv2(h))
        return (h + self.shortcut(x)).relu()


class CifarResNet(nn.Module):
    """Stem conv3x3, three stages of ``n`` basic blocks (strides 1, 2, 2), global avgpool, linear."""

    def __init__(self, in_channels: int, num_classes: int, n: int, stem: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        blocks: list[nn.Module] = []
        c = stem
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def _resnet(input_shape: tuple[int, ...], num_classes: int, depth: int, wide: bool) -> nn.Module:
    n = (depth - 2) // 6
    if wide:
        return CifarResNet(input_shape[0], num_classes, n, 32, (64, 128, 256))
    return CifarResNet(input_shape[0], num_classes, n, 16, (16, 32, 64))


# --------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (1x1-conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.project = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(x).relu()
        h = self.conv2(self.bn2(self.conv1(a)).relu())
        # As in the reference WRN: a projecting shortcut reads the activated input.
        return h + self.shortcut(a if self.project else x)


class WideResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, k: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c = 16
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


def _wrn(input_shape: tuple[int, ...], num_classes: int, depth: int, k: int) -> nn.Module:
    return WideResNet(input_shape[0], num_classes, depth, k)


def _init_conv_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- registry

# --------------------------------------------------------------------------- causal language models


class CausalLM(nn.Module):
    """A Hugging Face ``LlamaForCausalLM`` built from a config (random init, nothing downloaded).

    ``forward(tokens (N, L) int64) -> logits (N, L, V)``: position i scores token i + 1.
    ``self.hf`` is the Hugging Face model itself, what a ``Trainer`` trains.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens).logits


def llama_config(vocab_size: int, seq_len: int, hidden: int, layers: int):  # -> transformers.LlamaConfig
    """``llama_<hidden>x<layers>``: head size 32 (one head below 64), SwiGLU width 8/3 hidden
    rounded up to 8, tied input and output embeddings (at V = 128k the embedding dominates)."""
    from transformers import LlamaConfig

    heads = max(1, hidden // 32)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=-(-8 * hidden // 3 // 8) * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _llama(input_shape: tuple[int, ...], num_classes: int, hidden: int, layers: int) -> nn.Module:
    try:
        from transformers import LlamaForCausalLM
    except ImportError:  # pragma: no cover - the lm extra installs it
        raise ImportError('model: causal language models need transformers: pip install "kdbench[lm]"') from None
    return CausalLM(LlamaForCausalLM(llama_config(num_classes, input_shape[0], hidden, layers)))


FAMILIES: dict[str, ModelFamily] = {
    "linear": ModelFamily(r"linear", "any", lambda s, c: _mlp(s, c, 0, 0), "linear"),
    "mlp": ModelFamily(r"mlp(?:_(\d+)x(\d+))?", "any", _mlp, "mlp_256x3"),
    "cnn1d": ModelFamily(r"cnn1d(?:_(\d+))?", "sequence", _cnn1d, "cnn1d_64"),
    "cnn2d": ModelFamily(r"cnn2d(?:_(\d+))?", "image", _cnn2d, "cnn2d_16"),
    "resnet": ModelFamily(r"resnet(\d+)", "image", lambda s, c, d: _resnet(s, c, d, False), "resnet56"),
    "resnetx4": ModelFamily(r"resnet(\d+)x4", "image", lambda s, c, d: _resnet(s, c, d, True), "resnet8x4"),
    "wrn": ModelFamily(r"wrn_(\d+)_(\d+)", "image", _wrn, "wrn_40_2"),
    "llama": ModelFamily(r"llama_(\d+)x(\d+)", "tokens", _llama, "llama_64x2"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: its family, integer arguments and the input it takes."""

    name: str
    family: str
    args: tuple[int, ...]
    input_kind: str


def _check_args(family: str, args: tuple[int, ...], name: str) -> None:
    bad = None
    if family in ("mlp", "cnn1d", "cnn2d") and any(a < 1 for a in args[:1]):
        bad = "widths / channels must be >= 1"
    elif family in ("resnet", "resnetx4") and (args[0] < 8 or (args[0] - 2) % 6):
        bad = "depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
    elif family == "wrn" and (args[0] < 10 or (args[0] - 4) % 6 or args[1] < 1):
        bad = "depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...) and width k >= 1"
    elif family == "llama" and (args[0] < 8 or args[0] % 8 or args[1] < 1 or (args[0] >= 64 and args[0] % 32)):
        bad = "hidden size must be a multiple of 8 (of 32 from 64 up, the head size) and layers >= 1"
    if bad:
        raise ValueError(f"{name!r}: {bad}")


def parse_model(name: object, *, field: str = "model") -> ModelSpec:
    """Parse a model name; ``ValueError`` starting with ``field`` when it names no model."""
    if not isinstance(name, str):
        raise TypeError(f"{field}: expected a model name (str), got {type(name).__name__}")
    for family, spec in FAMILIES.items():
        m = re.fullmatch(spec.pattern, name)
        if m:
            args = tuple(int(g) for g in m.groups() if g is not None)
            try:
                _check_args(family, args, name)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
            return ModelSpec(name, family, args, spec.input_kind)
    examples = ", ".join(s.example for s in FAMILIES.values())
    raise ValueError(
        f"{field}: unknown model {name!r}; expected a name like {examples} (see kdbench.experiments.models)"
    )


def check_input(spec: ModelSpec, input_shape: tuple[int, ...], *, field: str = "model",
                kind: str = "classification") -> None:
    """``ValueError`` when the model cannot take inputs of ``input_shape`` from a dataset of ``kind``."""
    if (spec.input_kind == "tokens") != (kind == "lm"):
        if kind == "lm":
            raise ValueError(
                f"{field}: {spec.name!r} is a classifier; a language dataset needs a causal language model "
                f"such as 'llama_64x2' (hidden size x layers)"
            )
        raise ValueError(f"{field}: {spec.name!r} is a causal language model; it needs a language dataset "
                         f"(hmm_v<V>, ginc_v<V>), not a classification dataset")
    if spec.input_kind == "sequence" and not (len(input_shape) == 1 or (len(input_shape) == 2 and input_shape[0] == 1)):
        raise ValueError(f"{field}: {spec.name!r} takes 1-D sequences (L,), but the data has shape {input_shape}")
    if spec.input_kind == "image" and len(input_shape) != 3:
        raise ValueError(f"{field}: {spec.name!r} takes images (C, H, W), but the data has shape {input_shape}")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate model ``name`` for inputs ``(N, *input_shape)`` and ``num_classes`` outputs.

    Parameters are initialised from torch's global RNG: seed it first.
    """
    spec = parse_model(name)
    if spec.input_kind != "tokens":
        check_input(spec, tuple(input_shape))
    return FAMILIES[spec.family].build(tuple(input_shape), num_classes, *spec.args)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
