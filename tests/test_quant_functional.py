"""Functional joins: fx finds `x + y` / `torch.cat` in user models and they get QuantAdd / QuantConcat."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from harness.export.qdq import export_qdq
from harness.quant.calibrate import calibrate
from harness.quant.functional import FunctionalAdd, FunctionalConcat, insert_functional_joins
from harness.quant.modules import QuantAdd, QuantConcat
from harness.quant.rules import QuantConfigError, get_rule
from harness.quant.transform import QuantConfig, quantize_model, summarize


class UserNet(nn.Module):
    """A user model that writes its residual add and its concat as plain Python."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        r = torch.relu(self.a(s)) + s
        out: torch.Tensor = self.head(torch.cat([r, self.b(s)], dim=1) * x.shape[1])
        return out


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; its concat stays invisible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        if y.sum() > 0:
            y = torch.cat([y, y], 1)
        return y


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocked = Untraceable()
        self.tail = UserNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.blocked(x)
        if y.mean() > 100:
            return y
        out: torch.Tensor = self.tail(x)
        return out


def _batches() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 16, 16, generator=g),) for _ in range(4)]


def test_joins_become_quantized_and_match_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UserNet().eval()
    batches = _batches()
    cfg = QuantConfig(functional_joins=True, rules=(get_rule("shared_add"), get_rule("shared_concat")))
    q = quantize_model(model, cfg, example_inputs=batches[0])
    kinds = {n: type(m) for n, m in q.named_modules()}
    assert kinds["add"] is QuantAdd and kinds["cat"] is QuantConcat
    summary = summarize(q)
    assert {"add", "cat"} <= set(summary.quantized)
    calibrate(q, batches, progress=False)
    x = batches[1][0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.999
    snr_db = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert snr_db > 25
    path = export_qdq(q, (x,), tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    proto = onnx.load(str(path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    for op in ("Add", "Concat"):
        node = next(n for n in proto.graph.node if n.op_type == op and all(i in producers for i in n.input))
        assert all(producers[i].op_type == "DequantizeLinear" for i in node.input), op


def test_default_leaves_functional_joins_alone_and_says_why() -> None:
    batches = _batches()
    q = quantize_model(UserNet().eval(), QuantConfig(), example_inputs=batches[0])
    assert not any(isinstance(m, QuantAdd | QuantConcat) for m in q.modules())
    with pytest.raises(QuantConfigError, match="functional_joins"):
        quantize_model(UserNet().eval(), QuantConfig(rules=(get_rule("shared_concat"),)), example_inputs=batches[0])


def test_untraceable_module_is_named_and_children_still_traced() -> None:
    torch.manual_seed(0)
    original = Mixed().eval()
    model, found = insert_functional_joins(original)
    assert set(found.untraced) == {"", "blocked"}
    assert found.adds == ["tail.add"] and found.concats == ["tail.cat"]
    assert isinstance(model.get_submodule("tail.add"), FunctionalAdd)
    assert isinstance(model.get_submodule("tail.cat"), FunctionalConcat)
    x = _batches()[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    with pytest.raises(QuantConfigError, match=r"no concat found.*'<model>' \(Untraceable: TraceError"):
        quantize_model(Untraceable().eval(), QuantConfig(functional_joins=True, rules=(get_rule("shared_concat"),)),
                       example_inputs=_batches()[0])


def test_shape_arithmetic_is_not_a_join() -> None:
    _, found = insert_functional_joins(UserNet())
    assert found.adds == ["add"] and found.concats == ["cat"]
