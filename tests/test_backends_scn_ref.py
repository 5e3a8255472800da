"""Tests of harness.backends.scn_ref: export, validation, execution and caching of the SCN backends."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from harness.backends import scn_ref
from harness.cases import load_case
from harness.checks import run_check
from harness.context import CaseContext, RunOptions
from harness.errors import CaseError, ExportError
from harness.export import custom, scn_schema
from harness.export.custom import ScnExport, attribute
from harness.export.scn_executor import ScnExecutor
from harness.quant.tensor_quantizer import TensorQuantizer

pytest_plugins = ["pytester"]

# spconv's SparseConvTensor.dense indexes with a list (a torch deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

CASE = """\
name: scn-tiny
task: lidar
model:
  factory: {factory}
  args: {{widths: [8, 16, 16, 32], grid: [41, 180, 180], seed: 5, fit_voxels: 2000, fuse: true, fp16_params: true}}
data:
  factory: harness.datasets.lidar:LidarSweeps
  args: {{split: val, size: 1, seed: 1, grid: ci}}
  calibration: {{args: {{split: train, size: 2}}}}
  batch_size: 1
golden: {{dir: golden/scn-tiny, samples: 1}}
quant:
  quantizer: harness.quant.sparse:quantize_scn_model
  activations: {{calibrator: histogram, method: mse}}
  keep_float: [conv_input]
  calibration_batches: 2
  calibration_batch_size: 1
backends:
  torch-fp32: {{compare: {{atol: 1.0e-6, rtol: 5.0e-4}}}}
  fakequant-int8: {{compare: {{cosine_min: 0.99}}}}
  scn-ref: {{compare: {{cosine_min: 0.9999}}}}
  scn-ref-int8: {{compare: {{cosine_min: 0.99}}}}
"""

ZOO = "harness.zoo.centerpoint:centerpoint_scn"

SHIFTED = '''
import spconv.pytorch as spconv
from torch import nn
from harness.zoo.centerpoint import centerpoint_scn


class Shift(nn.Module):
    def forward(self, x):
        return x + 1.0  # SparseSequential hands plain modules the features


def shifted(**kwargs):
    model = centerpoint_scn(**kwargs)
    model.conv4 = spconv.SparseSequential(*model.conv4, Shift())
    return model
'''


def make_run(root: Path, factory: str = ZOO, cache: Path | None = None) -> CaseContext:
    """A CaseContext of the tiny SCN case under `root` (golden files written on first use)."""
    (root / "pyproject.toml").touch()
    (root / "cases").mkdir(exist_ok=True)
    path = root / "cases" / "scn_tiny.yaml"
    path.write_text(CASE.format(factory=factory))
    case = load_case(path, root=root)
    update = not (root / "golden/scn-tiny/meta.json").exists()
    return CaseContext(case, RunOptions(torch.device("cpu"), cache or root / ".cache", update_golden=update))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scn")


@pytest.fixture(scope="module")
def run(root: Path) -> Iterator[CaseContext]:
    run = make_run(root)
    run.golden_record()
    yield run
    for backend in list(run._runners):
        run.release(backend)


def _feeds(run: CaseContext) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in run.golden_record()["model"].inputs.items()}


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    x, y = a.double().flatten(), b.double().flatten()
    return float((x - y).abs().max()), float(x @ y / (x.norm() * y.norm()))


def test_scn_ref_exports_validates_and_runs_in_fp16(run: CaseContext) -> None:
    runner = run.runner("scn-ref")
    assert runner.info["provider"].startswith("qharness SCN reference executor (spconv 2.3.8")
    assert runner.info["precision"] == "fp16 storage, fp32 accumulation"
    assert runner.info["schema"] == "0 violations" and int(runner.info["onnx_nodes"]) == 39
    path = Path(runner.artifacts["onnx:model"])
    assert path.is_file() and path.parent.parent.name == "scn-fp16" and scn_schema.validate(path) == []
    feeds = _feeds(run)
    torch_out = run.runner("torch-fp32").run_stage("model", feeds)["dense"]
    out = runner.run_stage("model", feeds)["dense"]
    assert out.dtype == torch.float32 and out.shape == torch_out.shape == (1, 64, 23, 23)
    assert torch.equal(out, out.half().float())  # fp16 storage
    err, cos = _stats(out, torch_out)
    assert err > 0 and cos >= 0.9999
    # The same file in fp32 is the export's fidelity: the goal is max |err| <= 1e-4.
    err32, cos32 = _stats(ScnExecutor(path)(feeds["features"], feeds["indices"]), torch_out)
    assert err32 <= 1e-4 and cos32 >= 0.99999
    record = run_check(run, "golden", "scn-ref", "model")
    assert record.artifacts["onnx:model"] == str(path) and record.sections["compare"]["dense"]["passed"]


def test_export_is_cached_and_a_tampered_entry_is_rebuilt(run: CaseContext, root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(run.runner("scn-ref").artifacts["onnx:model"])
    original = path.read_bytes()
    export_scn = custom.export_scn

    def refuse(*args: Any, **kwargs: Any) -> ScnExport:
        raise AssertionError("exported again")

    monkeypatch.setattr(custom, "export_scn", refuse)
    again = make_run(root).runner("scn-ref")
    assert again.artifacts["onnx:model"] == str(path)
    broken = onnx.load(str(path))
    conv = next(n for n in broken.graph.node if n.name == "conv1")
    kept = [a for a in conv.attribute if a.name != "ndim"]
    del conv.attribute[:]
    conv.attribute.extend(kept)
    onnx.save(broken, str(path))
    with pytest.raises(AssertionError, match="exported again"), pytest.warns(UserWarning, match="rebuilding"):
        make_run(root).runner("scn-ref")  # the edited file is not used: the entry is rebuilt
    monkeypatch.setattr(custom, "export_scn", export_scn)
    with pytest.warns(UserWarning):
        rebuilt = Path(make_run(root).runner("scn-ref").artifacts["onnx:model"])
    assert rebuilt.read_bytes() == original


def test_schema_violation_fails_the_golden_item_naming_node_and_attribute(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_scn = custom.export_scn

    def without_output_bound(*args: Any, **kwargs: Any) -> ScnExport:
        export = export_scn(*args, **kwargs)
        conv = next(n for n in export.model.graph.node if n.name == "conv2")
        kept = [a for a in conv.attribute if a.name != "output_bound"]
        del conv.attribute[:]
        conv.attribute.extend(kept)
        return export

    monkeypatch.setattr(custom, "export_scn", without_output_bound)
    run = make_run(root, cache=tmp_path)
    with pytest.raises(ExportError) as info:
        run_check(run, "golden", "scn-ref", "model")
    lines = str(info.value).splitlines()
    assert lines[0] == "scn-tiny: the fp16 SCN export has 3 schema violation(s):"
    assert lines[1] == "  node 'conv2' (SparseConvolution) attribute 'output_bound': missing"
    assert not list(tmp_path.glob("scn-tiny/scn-fp16/*/scn.onnx"))  # nothing invalid is cached


def test_int8_shares_the_calibration_of_fakequant(run: CaseContext) -> None:
    feeds = _feeds(run)
    fakequant = run.runner("fakequant-int8").run_stage("model", feeds)["dense"]
    runner = run.runner("scn-ref-int8")
    assert runner.info["precision"] == "int8 ranges as fake quantization (fp32 storage)"
    assert len(list(run.cache.root.glob("scn-tiny/calibration/*/amax.pt"))) == 1
    model = onnx.load(runner.artifacts["onnx:model"])
    convs = [n for n in model.graph.node if n.op_type == "SparseConvolution"]
    assert attribute(convs[0], "precision") == "fp16" and attribute(convs[1], "precision") == "int8"
    assert attribute(convs[-1], "output_precision") == "fp16"
    quantized = run.quantized_model()
    quantizer = quantized.get_submodule("conv2.0.input_quantizer")
    assert isinstance(quantizer, TensorQuantizer) and quantizer.amax is not None
    assert attribute(convs[5], "input_dynamic_range") == pytest.approx(float(quantizer.amax))
    out = runner.run_stage("model", feeds)["dense"]
    err, cos = _stats(out, fakequant)
    assert err <= 1e-4 and cos >= 0.99999
    float_out = run.runner("torch-fp32").run_stage("model", feeds)["dense"]
    assert _stats(out, float_out)[1] >= 0.97
    assert run_check(run, "golden", "fakequant-int8", "model").sections["compare"]["dense"]["stats"]["cosine"] == pytest.approx(
        run_check(run, "golden", "scn-ref-int8", "model").sections["compare"]["dense"]["stats"]["cosine"], abs=1e-6)


def test_unsupported_layer_names_the_module_path(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shifted_scn.py").write_text(SHIFTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shifted_scn", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    run = make_run(project, factory="shifted_scn:shifted")
    with pytest.raises(ExportError, match=r"'conv4\.3': unsupported layer Shift met during tracing"):
        run.runner("scn-ref")


def test_bn_is_fused_before_export_as_nvidia_does(run: CaseContext) -> None:
    from harness.zoo.centerpoint import centerpoint_scn

    unfused = centerpoint_scn(widths=(8, 16, 16, 32), grid=(41, 180, 180), seed=5, fit_voxels=2000)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in unfused.modules())
    fused = scn_ref.fused(unfused)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    feeds = _feeds(run)
    with torch.no_grad():
        export = custom.export_scn(fused, feeds["features"].float(), feeds["indices"])
    assert scn_schema.validate(export.model) == [] and export.num_nodes == 39


def test_multi_input_programs_are_refused(run: CaseContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run.adapter, "input_names", ("features", "indices", "extra"))
    with pytest.raises(ExportError, match=r"scn-tiny: the SCN backends run one stage with inputs \(features, indices\)"):
        scn_ref.ScnRefFP16().prepare(_context(run))


def test_quantizer_key_errors_name_the_key(root: Path) -> None:
    run = make_run(root)
    run.case.spec = run.case.spec.model_copy(update={"quant": run.case.spec.quant.model_copy(
        update={"keep_float": ["conv9"]})})
    with pytest.raises(CaseError, match=r"key 'quant.keep_float.0': keep_float pattern 'conv9' matches no sparse conv or add"):
        run.quantized_model()
    run = make_run(root)
    run.case.spec = run.case.spec.model_copy(update={"quant": run.case.spec.quant.model_copy(
        update={"rules": ["shared_input"]})})
    with pytest.raises(CaseError, match=r"key 'quant.rules.0': rule 'shared_input': the SCN quantizer"):
        run.quantized_model()


def _context(run: CaseContext) -> Any:
    return run.prepare_context()


def test_outputs_are_finite_and_deterministic(run: CaseContext) -> None:
    feeds = _feeds(run)
    runner = run.runner("scn-ref")
    a, b = runner.run_stage("model", feeds)["dense"], runner.run_stage("model", feeds)["dense"]
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert np.count_nonzero(a.numpy()) > 0


BROKEN_EXPORT = '''
import harness.export.custom as custom

_export = custom.export_scn


def _without_activation(*args, **kwargs):
    export = _export(*args, **kwargs)
    conv = next(n for n in export.model.graph.node if n.name == "conv3")
    kept = [a for a in conv.attribute if a.name != "activation"]
    del conv.attribute[:]
    conv.attribute.extend(kept)
    return export


custom.export_scn = _without_activation
'''


@pytest.mark.slow
def test_schema_violation_is_a_failing_item_in_pytest(pytester: pytest.Pytester) -> None:
    """The scn-ref golden item is the schema item: it validates the export before running it."""
    (pytester.path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nfilterwarnings = ["ignore::UserWarning", "ignore::DeprecationWarning"]\n')
    pytester.makeconftest(BROKEN_EXPORT)
    (pytester.path / "cases").mkdir()
    (pytester.path / "cases" / "scn_tiny.yaml").write_text(CASE.format(factory=ZOO))
    result = pytester.runpytest_subprocess("cases/", "-m", "golden", "--update-golden", "-p", "no:cacheprovider",
                                           "--backend", "torch-fp32,scn-ref",
                                           "--qharness-cache", str(pytester.path / ".cache"))
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*scn-tiny: the fp16 SCN export has 1 schema violation(s):",
        "  node 'conv3' (SparseConvolution) attribute 'activation': missing",
        "*FAILED cases/scn_tiny.yaml::scn-tiny[[]scn-ref[]]::golden*",
    ])
    assert "Traceback" not in result.stdout.str()
