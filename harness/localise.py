"""Find the layers that lose int8 accuracy and the smallest set to keep float.

`sensitivity` ranks the quantized layers of a calibrated model: first by the cheap proxy (each
layer's output SNR with only that layer int8, `harness.quant.analysis`), then, for the `top_k`
worst by the proxy, by the metric itself: the metric lost when only that layer is int8 (against
float) and the metric regained when only that layer is float (against full int8).
`autoquant` keeps layers float greedily in that order until the target holds, then puts back to
int8 every kept-float layer the target does not need, and reports the `keep_float` list, the
metric before / after and the share of conv / linear MACs still int8.

Making a layer float here means its input quantizers are bypassed (only for that layer: a
quantizer shared with other layers keeps quantizing their inputs) and its weight quantizer is
disabled. The case functions (`case_sensitivity`, `case_autoquant`) evaluate the case metric over
its evaluation set and cache every evaluation in the case's cache, keyed by the quantized
model's identity, the metric and data settings and the set of float layers.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]

from harness.cache import content_key
from harness.checks.metric import gated_keys
from harness.compare import CosineAccumulator
from harness.errors import HarnessError
from harness.quant.modules import QuantModule, quant_modules
from harness.quant.rules import Batch, call_model, quantizers_disabled
from harness.quant.tensor_quantizer import QuantMode, TensorQuantizer

if TYPE_CHECKING:
    from harness.context import CaseContext

Evaluate = Callable[[nn.Module], float]


class LocaliseError(HarnessError):
    """A sensitivity or autoquant request that cannot be served (names the case, layer or target)."""


@contextlib.contextmanager
def float_layers(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run the quantized layers `names` of `model` in float inside the block (inputs and weight
    unquantized), every other quantizer as it was; restored afterwards."""
    saved: list[tuple[QuantModule, nn.Module | None, dict[str, nn.Module], TensorQuantizer | None, QuantMode]] = []
    try:
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, QuantModule):
                raise LocaliseError(f"layer '{name}' is not a quantized layer")
            current = getattr(module, "input_quantizer", None)
            overrides = getattr(module, "input_overrides", None)
            kept = dict(overrides.items()) if isinstance(overrides, nn.ModuleDict) else {}
            weight = getattr(module, "weight_quantizer", None)
            wq = weight if isinstance(weight, TensorQuantizer) else None
            saved.append((module, current, kept, wq, wq.mode if wq is not None else QuantMode.DISABLED))
            if current is not None:
                module.input_quantizer = nn.Identity()
            if isinstance(overrides, nn.ModuleDict):
                for key in kept:
                    overrides[key] = nn.Identity()
            if wq is not None:
                wq.set_mode(QuantMode.DISABLED)
        yield model
    finally:
        for module, current, kept, wq, mode in reversed(saved):
            if current is not None:
                module.input_quantizer = current
            overrides = getattr(module, "input_overrides", None)
            if isinstance(overrides, nn.ModuleDict):
                for key, value in kept.items():
                    overrides[key] = value
            if wq is not None:
                wq.set_mode(mode)


@dataclass(frozen=True)
class Sensitivity:
    """One layer's ranking figures; metric figures are None outside the top k."""

    name: str
    proxy_snr_db: float | None
    only_int8: float | None
    only_float: float | None
    lost: float | None
    regained: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (inf becomes "inf")."""
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SensitivityResult:
    """Float and full-int8 metric, and the layers ranked by metric regained (then by proxy)."""

    metric: str
    higher_is_better: bool
    float_value: float
    int8_value: float
    layers: tuple[Sensitivity, ...]


def _better(higher: bool, a: float, b: float) -> float:
    """How much better `a` is than `b` in the metric's direction."""
    return a - b if higher else b - a


def sensitivity(model: nn.Module, proxy: Mapping[str, float], evaluate: Evaluate, *, float_value: float,
                higher_is_better: bool = True, top_k: int = 5, metric: str = "metric",
                progress: bool = True) -> SensitivityResult:
    """Rank the quantized layers of `model` named in `proxy` (layer -> alone SNR dB): the `top_k`
    lowest by SNR get the metric with only that layer int8 and with only that layer float
    (`evaluate(model)` computes the metric); they come first, by metric regained."""
    names = sorted(proxy, key=lambda n: proxy[n])
    quantized = [n for n, _ in quant_modules(model)]
    unknown = [n for n in names if n not in quantized]
    if unknown:
        raise LocaliseError(f"layers not quantized in the model: {unknown[:5]}")
    int8_value = evaluate(model)
    measured: dict[str, Sensitivity] = {}
    for name in tqdm(names[:top_k], desc="sensitivity", disable=not progress, leave=False):
        with float_layers(model, [n for n in quantized if n != name]):
            only_int8 = evaluate(model)
        with float_layers(model, [name]):
            only_float = evaluate(model)
        measured[name] = Sensitivity(name, proxy[name], only_int8, only_float,
                                     _better(higher_is_better, float_value, only_int8),
                                     _better(higher_is_better, only_float, int8_value))
    ranked = sorted(measured.values(), key=lambda s: -(s.regained or 0.0))
    rest = [Sensitivity(n, proxy[n], None, None, None, None) for n in names[top_k:]]
    return SensitivityResult(metric, higher_is_better, float_value, int8_value, tuple(ranked + rest))


@dataclass(frozen=True)
class Target:
    """`min_ratio` (metric >= ratio * float, in the metric's direction) or `max_drop` (absolute)."""

    min_ratio: float | None = None
    max_drop: float | None = None

    @staticmethod
    def parse(text: str) -> Target:
        """`min_ratio=0.995` or `max_drop=0.01` (LocaliseError otherwise)."""
        key, _, value = text.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise LocaliseError(f"target '{text}': expected min_ratio=<float> or max_drop=<float>") from None
        if key.strip() == "min_ratio":
            return Target(min_ratio=number)
        if key.strip() == "max_drop":
            return Target(max_drop=number)
        raise LocaliseError(f"target '{text}': unknown key '{key}' (expected min_ratio or max_drop)")

    def holds(self, value: float, float_value: float, higher: bool) -> bool:
        """True when `value` meets the target against `float_value`."""
        if math.isnan(value):
            return False
        if self.min_ratio is not None:
            bound = self.min_ratio * float_value if higher else float_value / self.min_ratio
            return value >= bound if higher else value <= bound
        assert self.max_drop is not None
        return _better(higher, float_value, value) <= self.max_drop

    def __str__(self) -> str:
        return f"min_ratio={self.min_ratio}" if self.min_ratio is not None else f"max_drop={self.max_drop}"


@dataclass(frozen=True)
class AutoQuant:
    """The keep_float list that meets the target, the metric before / after, int8 MAC share."""

    keep_float: tuple[str, ...]
    target: str
    met: bool
    float_value: float
    before: float
    after: float
    int8_macs_before: float
    int8_macs_after: float


def conv_macs(model: nn.Module, batch: Batch) -> dict[str, int]:
    """Multiply-accumulates of every conv / linear layer (quantized or not) on one batch, by name
    (summed over calls), counted with forward hooks."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def count(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, nn.ConvTranspose2d):
                kernel = math.prod(module.kernel_size)
                n = args[0].numel() * module.out_channels // module.groups * kernel
            elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                kernel = math.prod(module.kernel_size)
                n = output.numel() * module.in_channels // module.groups * kernel
            else:
                assert isinstance(module, nn.Linear)
                n = output.numel() * module.in_features
            macs[name] = macs.get(name, 0) + int(n)
        return count

    for name, module in model.named_modules():
        if name and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with quantizers_disabled(model), torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return macs


def int8_share(model: nn.Module, macs: Mapping[str, int], kept_float: Sequence[str]) -> float:
    """Share of `macs` in layers that are quantized and not in `kept_float`."""
    total = sum(macs.values())
    quantized = {n for n, _ in quant_modules(model)} - set(kept_float)
    return sum(v for n, v in macs.items() if n in quantized) / total if total else 0.0


def autoquant(model: nn.Module, ranking: Sequence[str], evaluate: Evaluate, target: Target, *,
              float_value: float, higher_is_better: bool, macs: Mapping[str, int],
              progress: bool = True) -> AutoQuant:
    """Keep layers float in `ranking` order until `target` holds, then return to int8 (latest
    first) every kept layer the target does not need. When keeping every ranked layer float
    does not reach the target, the result says so (`met` False) with all of them kept."""
    before = evaluate(model)
    kept: list[str] = []
    value = before
    bar = tqdm(total=len(ranking), desc="autoquant", disable=not progress, leave=False)
    for name in ranking:
        if target.holds(value, float_value, higher_is_better):
            break
        kept.append(name)
        with float_layers(model, kept):
            value = evaluate(model)
        bar.update(1)
    bar.close()
    met = target.holds(value, float_value, higher_is_better)
    if met:
        for name in list(reversed(kept)):
            trial = [n for n in kept if n != name]
            with float_layers(model, trial):
                trial_value = evaluate(model)
            if target.holds(trial_value, float_value, higher_is_better):
                kept, value = trial, trial_value
    return AutoQuant(tuple(kept), str(target), met, float_value, before, value,
                     int8_share(model, macs, []), int8_share(model, macs, kept))


# -- the case ------------------------------------------------------------------------------


def _case_model(ctx: CaseContext) -> nn.Module:
    return copy.deepcopy(ctx.quantized_model()).to(ctx.options.device).eval()


OUTPUT_COSINE = "output_cosine"
"""The figure cases without a metric are ranked by: the lowest cosine, over the program's outputs
accumulated over the evaluation set, against the float model's outputs (1.0 for float itself)."""


def case_evaluator(ctx: CaseContext) -> tuple[Evaluate, str, bool]:
    """(evaluate, metric key, higher is better) for the case's first gated figure, or for
    OUTPUT_COSINE when the case has no metric; every evaluation is cached by the set of layers
    that are float at the time."""
    spec = ctx.case.spec.metric
    cls = ctx.metric_class
    if spec is None or cls is None:
        key, higher = OUTPUT_COSINE, True
        reference: list[dict[str, torch.Tensor]] = []
        measure: Callable[[nn.Module], float] = lambda model: _output_cosine(ctx, model, reference)  # noqa: E731
    else:
        key = gated_keys(ctx)[0]
        higher = cls.figure(key).direction == "higher"
        measure = lambda model: _metric(ctx, model, key)  # noqa: E731
    base = content_key("sensitivity", ctx.quant_key, spec.model_dump() if spec else None,
                       ctx.case.spec.data.model_dump(), ctx.case.spec.task_args, ctx.options.device.type)

    def evaluate(model: nn.Module) -> float:
        floats = sorted(n for n, m in quant_modules(model) if _is_float_now(m))
        def compute() -> float:
            return measure(model)
        value: float = ctx.cache.json_value(f"{ctx.case.name}/sensitivity", content_key(base, key, floats), compute)
        return value

    return evaluate, key, higher


def case_float_value(ctx: CaseContext, key: str) -> float:
    """The float model's value of `key` (the cached float metric; 1.0 for OUTPUT_COSINE)."""
    return 1.0 if key == OUTPUT_COSINE else float(ctx.float_metric()["values"][key])


def _output_cosine(ctx: CaseContext, model: nn.Module, reference: list[dict[str, torch.Tensor]]) -> float:
    """Lowest cosine over the outputs of `model` against the float model's on the evaluation set;
    the float outputs are computed once into `reference`."""
    device = ctx.options.device
    if not reference:
        float_program = ctx.program(ctx.float_model().to(device))
        for batch in ctx.eval_batches():
            with torch.inference_mode():
                outputs = float_program.run_eager({k: v.to(device) for k, v in batch.inputs.items()})
            reference.append({k: v.detach().cpu() for k, v in outputs.items()})
    program = ctx.program(model)
    sums: dict[str, CosineAccumulator] = {}
    for batch, expected in zip(ctx.eval_batches(), reference, strict=True):
        with torch.inference_mode():
            outputs = program.run_eager({k: v.to(device) for k, v in batch.inputs.items()})
        for name, tensor in outputs.items():
            sums.setdefault(name, CosineAccumulator()).add(tensor.detach().cpu().numpy(), expected[name].numpy())
    return min(acc.value for acc in sums.values())


def _is_float_now(module: QuantModule) -> bool:
    weight = getattr(module, "weight_quantizer", None)
    if isinstance(weight, TensorQuantizer):
        return weight.mode is QuantMode.DISABLED
    return not module.input_quantizers()


def _metric(ctx: CaseContext, model: nn.Module, key: str) -> float:
    metric = ctx.metric()
    program = ctx.program(model)
    device = ctx.options.device
    for batch in ctx.eval_batches():
        with torch.inference_mode():
            outputs = program.run_eager({k: v.to(device) for k, v in batch.inputs.items()})
        predictions = ctx.adapter.decode({k: v.detach().cpu() for k, v in outputs.items()}, batch)
        metric.update(predictions, ctx.adapter.targets(batch), batch.sample_ids)
    return float(metric.compute().values[key])


def case_sensitivity(ctx: CaseContext, top_k: int = 5, progress: bool = True) -> SensitivityResult:
    """`sensitivity` of the case's calibrated model: proxy from the per-layer report on the
    golden inputs, metric over the evaluation set (cached per float-layer set)."""
    from harness.layerwise import case_layers

    evaluate, key, higher = case_evaluator(ctx)
    proxy = {e.name: float(e.alone_snr_db) for s in case_layers(ctx).values() for e in s.errors
             if e.alone_snr_db is not None}
    float_value = case_float_value(ctx, key)
    return sensitivity(_case_model(ctx), proxy, evaluate, float_value=float_value, higher_is_better=higher,
                       top_k=top_k, metric=key, progress=progress)


def case_autoquant(ctx: CaseContext, target: Target, top_k: int = 5, progress: bool = True) -> AutoQuant:
    """`autoquant` of the case: ranking from `case_sensitivity` (metric-ranked top k, then the
    rest by proxy), MACs counted on the first golden stage's inputs."""
    result = case_sensitivity(ctx, top_k, progress)
    evaluate, _, higher = case_evaluator(ctx)
    model = _case_model(ctx)
    feeds = ctx.stage_feeds()
    program = ctx.program(model)
    macs: dict[str, int] = {}
    for stage_name, stage in program.stages.items():
        prefix = next(f"{n}." if n else "" for n, m in model.named_modules() if m is stage.module)
        batch = tuple(feeds[stage_name][n].to(ctx.options.device) for n in stage.inputs)
        macs.update({f"{prefix}{n}": v for n, v in conv_macs(stage.module, batch).items()})
    ranking = [s.name for s in result.layers]
    return autoquant(model, ranking, evaluate, target, float_value=result.float_value, higher_is_better=higher,
                     macs=macs, progress=progress)
