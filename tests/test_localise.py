"""sensitivity / autoquant on the fragile-layer model: the fragile layer ranks first and is the
one layer autoquant keeps float; float_layers bypasses exactly one layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_quant_analysis import batches, chain, quantized
from torch import nn

from harness.localise import (
    LocaliseError,
    Target,
    autoquant,
    conv_macs,
    float_layers,
    int8_share,
    sensitivity,
)
from harness.quant.analysis import layer_errors
from harness.quant.modules import QuantConv2d


def _cosine_metric(reference: nn.Module, xs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        refs = [reference(x) for x in xs]

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            outs = torch.cat([model(x).flatten() for x in xs]).double()
        ref = torch.cat([r.flatten() for r in refs]).double()
        return float(outs @ ref / (outs.norm() * ref.norm()))

    return evaluate


def test_float_layers_bypasses_one_layer_and_restores() -> None:
    model = chain()
    q = quantized(model)
    x = batches(1)[0]
    with torch.no_grad():
        full = q(x)
        with float_layers(q, ["0", "2", "4", "6"]):
            assert torch.allclose(q(x), model(x), atol=1e-5)
        assert torch.equal(q(x), full)
        with float_layers(q, ["2"]):
            partial = q(x)
    assert not torch.equal(partial, full)
    with pytest.raises(LocaliseError, match="'1'"), float_layers(q, ["1"]):
        pass


def test_fragile_layer_ranks_first_and_is_the_one_kept_float() -> None:
    model = chain(fragile=True)
    q = quantized(model)
    xs = batches(2)
    proxy = {e.name: float(e.alone_snr_db) for e in layer_errors(q, [(x,) for x in xs]) if e.alone_snr_db is not None}
    evaluate = _cosine_metric(model, xs)
    result = sensitivity(q, proxy, evaluate, float_value=1.0, top_k=2, progress=False)
    assert result.layers[0].name == "2"
    assert result.layers[0].regained is not None and result.layers[0].regained > 0
    assert result.int8_value < 1.0
    macs = conv_macs(q, (xs[0],))
    assert set(macs) == {"0", "2", "4", "6"} and macs["2"] == 2 * 8 * 12 * 12 * 8 * 9
    target = Target.parse("min_ratio=0.9999")
    assert not target.holds(result.int8_value, 1.0, True)
    # The fragile layer alone fixes it (checked directly, so the test does not depend on autoquant).
    with float_layers(q, ["2"]):
        assert target.holds(evaluate(q), 1.0, True)
    found = autoquant(q, [s.name for s in result.layers], evaluate, target, float_value=1.0, higher_is_better=True,
                      macs=macs, progress=False)
    assert found.met and found.keep_float == ("2",)
    assert found.int8_macs_before == 1.0
    assert found.int8_macs_after == pytest.approx(int8_share(q, macs, ["2"]))
    assert found.int8_macs_after == pytest.approx(1 - macs["2"] / sum(macs.values()))
    assert all(isinstance(m, QuantConv2d) for n, m in q.named_modules() if n in macs)


def test_autoquant_prunes_layers_the_target_does_not_need() -> None:
    model = chain(fragile=True)
    q = quantized(model)
    xs = batches(2)
    evaluate = _cosine_metric(model, xs)
    macs = conv_macs(q, (xs[0],))
    # A bad ranking puts harmless layers first; pruning removes them again.
    found = autoquant(q, ["0", "6", "2", "4"], evaluate, Target(min_ratio=0.9999), float_value=1.0,
                      higher_is_better=True, macs=macs, progress=False)
    assert found.keep_float == ("2",)


def test_unreachable_target_is_reported() -> None:
    model = chain(fragile=True)
    q = quantized(model)
    xs = batches(1)
    found = autoquant(q, ["2"], _cosine_metric(model, xs), Target(max_drop=-1.0), float_value=1.0,
                      higher_is_better=True, macs=conv_macs(q, (xs[0],)), progress=False)
    assert not found.met and found.keep_float == ("2",)


@pytest.mark.parametrize("text", ["min_ratio", "ratio=0.9", "min_ratio=x"])
def test_bad_targets_name_the_text(text: str) -> None:
    with pytest.raises(LocaliseError, match=text):
        Target.parse(text)


def test_lower_is_better_targets() -> None:
    assert Target(min_ratio=0.9).holds(1.1, 1.0, False) and not Target(min_ratio=0.9).holds(1.2, 1.0, False)
    assert Target(max_drop=0.1).holds(1.05, 1.0, False) and not Target(max_drop=0.1).holds(1.2, 1.0, False)


def test_cli_ranks_only_on_the_quantization_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    assert main(["sensitivity", "cases/pidnet_s.yaml", "--backend", "ort-int8"]) == 2
    assert "--backend ort-int8: layers are ranked on the quantization reference (fakequant-int8)" in capsys.readouterr().err


def test_a_case_without_a_metric_is_ranked_by_output_cosine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiny import CASE

    from harness.cases import load_case
    from harness.context import CaseContext, RunOptions
    from harness.localise import OUTPUT_COSINE, case_autoquant, case_sensitivity

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases/tiny.yaml").write_text(CASE)
    ctx = CaseContext(load_case(tmp_path / "cases/tiny.yaml"), RunOptions(torch.device("cpu"), tmp_path / ".cache"))
    result = case_sensitivity(ctx, top_k=2, progress=False)
    assert result.metric == OUTPUT_COSINE and result.float_value == 1.0 and 0.9 < result.int8_value < 1.0
    measured = [s for s in result.layers if s.only_float is not None]
    assert len(measured) == 2 and all(s.only_float is not None and s.only_float >= result.int8_value - 1e-6
                                      for s in measured)
    found = case_autoquant(ctx, Target(min_ratio=0.99999), top_k=2, progress=False)
    assert found.met and found.after >= 0.99999 and found.keep_float
