"""Seeded, resumable training of segmentation models with PIDNet's heads and losses.

The loop follows the official PIDNet recipe: the model returns (aux P logits, main logits,
boundary logits) in training mode; all three are resized to the label resolution; the semantic
loss is cross-entropy on aux (weight 0.4) plus cross-entropy or OHEM on main (weight 1); the
boundary head gets a class-balanced BCE (x20) against boundaries derived from the label map; and
the main head gets its semantic loss again on the pixels whose predicted boundary probability
exceeds 0.8. SGD with momentum (or AdamW) under a poly learning-rate schedule; random scale,
crop and flip; AMP (bfloat16) and channels_last on CUDA.

Every sample the loop sees is a function of (seed, global sample number) only: the order is a
per-epoch permutation seeded by (seed, epoch), the augmentation parameters are seeded by
(seed, sample number). A run stopped anywhere (`stop_after`, `time_limit_s`, a crash after a
checkpoint) and resumed from `out_dir/checkpoint.pt` therefore continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.atomic import write_json_atomic
from harness.errors import HarnessError
from harness.metrics.miou import MeanIoU, MeanIoUResult
from harness.tasks.segmentation import IMAGENET_MEAN, IMAGENET_STD
from harness.training.common import (
    CHECKPOINT,
    SUMMARY,
    WEIGHTS,
    Progress,
    RangeSampler,
    Schedule,
    TrainResult,
    finished_run,
    fp16_state,
    hardware,
    load_checkpoint,
    parameter_groups,
    save_atomic,
    save_checkpoint,
    set_learning_rate,
    step_bar,
    worker_init,
)
from harness.zoo.pidnet import inference_state_dict


class SegSample(Protocol):
    """What a dataset item must offer: an (H, W, 3) uint8 RGB image and an (H, W) label map."""

    @property
    def image(self) -> npt.NDArray[np.uint8]: ...

    @property
    def label(self) -> npt.NDArray[np.uint8]: ...


class SegDataset(Protocol):
    """A sized, indexable collection of `SegSample`s (e.g. `harness.datasets.roads.RoadScenes`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SegSample: ...


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that decides the trained weights; a resumed run must present the same."""

    steps: int
    batch_size: int
    lr: float
    crop: tuple[int, int]
    num_classes: int = 19
    ignore_index: int = 255
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    aux_weight: float = 0.4
    ohem: bool = False
    ohem_thresh: float = 0.9
    ohem_min_kept: int = 131072
    boundary: bool = True
    boundary_weight: float = 20.0
    boundary_sem_weight: float = 1.0
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    amax_lr_scale: float = 1.0
    dataset: str = ""
    val_dataset: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise HarnessError(
                f"training needs steps >= 1, batch_size >= 1, lr > 0; got steps={self.steps}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise HarnessError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if min(self.crop) < 8:
            raise HarnessError(f"crop must be at least 8x8, got {self.crop}")


# ----------------------------------------------------------------------------------------------
# Losses.


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x.float()
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over pixels whose target is not `ignore_index` (0 when there are
    none, rather than NaN)."""
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).sum()
    return losses.sum() / valid.clamp(min=1)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    thresh: float = 0.9,
    min_kept: int = 131072,
) -> torch.Tensor:
    """Online hard example mining as in PIDNet: mean cross-entropy over the valid pixels whose
    predicted probability of the true class is below max(thresh, the min_kept-th smallest such
    probability)."""
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = (target != ignore_index).flatten()
    if not bool(valid.any()):
        return logits.sum() * 0.0
    with torch.no_grad():
        prob = F.softmax(logits.float(), dim=1)
        safe = target.clone()
        safe[safe == ignore_index] = 0
        p_true = prob.gather(1, safe.unsqueeze(1)).flatten()[valid]
        ordered = p_true.sort().values
        kth = ordered[min(min_kept, ordered.numel() - 1)]
        threshold = torch.clamp(kth, min=thresh)
        keep = p_true < threshold
    kept = losses[valid][keep]
    return kept.sum() / max(int(kept.numel()), 1)


def boundary_targets(label: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """(N, H, W) float 0/1: pixels whose 3x3 neighbourhood holds more than one label value
    (ignore included), dilated `dilate` times by 3x3 (a band about 4 pixels wide, as PIDNet's
    dilated Canny edges of the label map)."""
    lab = label.unsqueeze(1).float()
    high = F.max_pool2d(lab, 3, stride=1, padding=1)
    low = -F.max_pool2d(-lab, 3, stride=1, padding=1)
    edge = (high != low).float()
    for _ in range(dilate):
        edge = F.max_pool2d(edge, 3, stride=1, padding=1)
    return edge.squeeze(1)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with each side weighted by the other side's share (PIDNet's
    boundary loss before its x20)."""
    x = logits.flatten().float()
    t = target.flatten().float()
    pos = t.sum()
    total = torch.tensor(float(t.numel()), device=t.device)
    weight = torch.where(t > 0.5, (total - pos) / total, pos / total)
    return F.binary_cross_entropy_with_logits(x, t, weight=weight)


def pidnet_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor, recipe: TrainRecipe
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total PIDNet training loss and its parts for (aux, main, boundary) outputs (or a single
    main logits tensor: cross-entropy / OHEM only)."""
    size = (label.shape[-2], label.shape[-1])
    ign = recipe.ignore_index

    def semantic(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recipe.ohem:
            return ohem_cross_entropy(logits, target, ign, recipe.ohem_thresh, recipe.ohem_min_kept)
        return cross_entropy(logits, target, ign)

    if isinstance(outputs, torch.Tensor):
        main = _upsample(outputs, size)
        loss = semantic(main, label)
        return loss, {"loss": float(loss.detach()), "main": float(loss.detach())}
    if len(outputs) != 3:
        raise HarnessError(f"expected (aux, main, boundary) outputs, got {len(outputs)} tensors")
    aux, main, bd = (_upsample(o, size) for o in outputs)
    loss_main = semantic(main, label)
    loss_aux = cross_entropy(aux, label, ign)
    loss = loss_main + recipe.aux_weight * loss_aux
    parts = {"main": float(loss_main.detach()), "aux": float(loss_aux.detach())}
    if recipe.boundary:
        loss_bd = recipe.boundary_weight * weighted_bce(bd[:, 0], boundary_targets(label))
        with torch.no_grad():
            on_edge = torch.where(torch.sigmoid(bd[:, 0]) > 0.8, label, torch.full_like(label, ign))
        loss_sb = recipe.boundary_sem_weight * semantic(main, on_edge)
        loss = loss + loss_bd + loss_sb
        parts |= {"boundary": float(loss_bd.detach()), "boundary_sem": float(loss_sb.detach())}
    parts["loss"] = float(loss.detach())
    return loss, parts


# ----------------------------------------------------------------------------------------------
# Data: a deterministic schedule, rendering in DataLoader workers, augmentation on the device.


class _Rendered(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Dataset items as tensors ((3, H, W) uint8 image, (H, W) uint8 label); item i is dataset
    item `index(i)`. Rendering happens wherever this is indexed (DataLoader workers)."""

    def __init__(self, dataset: SegDataset, index: Callable[[int], int] | None = None) -> None:
        self.dataset = dataset
        self.index = index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[i if self.index is None else self.index(i)]
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(sample.label))


def _loader(
    items: Dataset[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    stop: int,
    batch_size: int,
    workers: int,
    pin: bool,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    return DataLoader(
        items,
        batch_size=batch_size,
        sampler=RangeSampler(start, stop),
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, /255 then ImageNet mean / std (as `tasks.segmentation`)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: npt.NDArray[np.float64],
    recipe: TrainRecipe,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale (bilinear image, nearest label), crop to `recipe.crop` (padding the
    normalised image with 0 and the label with ignore) and horizontal flip, per sample.

    images: (N, 3, H, W) uint8, labels (N, H, W) uint8, params (N, 4) uniforms.
    Returns normalised float images (N, 3, ch, cw) and int64 labels (N, ch, cw).
    """
    ch, cw = recipe.crop
    lo, hi = recipe.scale_range
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    x_all = _normalize(images)
    for k in range(images.shape[0]):
        u_scale, u_y, u_x, u_flip = (float(v) for v in params[k])
        s = lo + (hi - lo) * u_scale
        h, w = images.shape[-2:]
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        x = F.interpolate(x_all[k : k + 1], size=(nh, nw), mode="bilinear", align_corners=False)
        y = F.interpolate(labels[k : k + 1, None].float(), size=(nh, nw), mode="nearest")
        pad_h, pad_w = max(ch - nh, 0), max(cw - nw, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=float(recipe.ignore_index))
        top = int(u_y * (x.shape[-2] - ch + 1))
        left = int(u_x * (x.shape[-1] - cw + 1))
        x = x[..., top : top + ch, left : left + cw]
        y = y[..., top : top + ch, left : left + cw]
        if recipe.flip and u_flip < 0.5:
            x = x.flip(-1)
            y = y.flip(-1)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)[:, 0].long()


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _main_logits(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out[1] if len(out) == 3 else out[0]


def evaluate_segmentation(
    model: nn.Module,
    samples: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    batch_size: int = 8,
    amp: bool = False,
    channels_last: bool = False,
) -> MeanIoUResult:
    """mIoU of `model` (eval mode, main logits resized to each label's size, argmax) over
    (image, label) pairs of equal size."""
    device = torch.device(device)
    metric = MeanIoU(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = torch.from_numpy(np.stack([im.transpose(2, 0, 1) for im, _ in chunk]))
            x = _normalize(images.to(device)).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = _main_logits(model(x))
            size = (chunk[0][1].shape[0], chunk[0][1].shape[1])
            pred = _upsample(logits, size).argmax(1).to(torch.uint8).cpu().numpy()
            for k, (_, label) in enumerate(chunk):
                metric.update(pred[k], label, sample=start + k)
    model.train(was_training)
    return metric.compute()


# ----------------------------------------------------------------------------------------------
# The loop.


def _render_all(
    dataset: SegDataset, workers: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise HarnessError(f"dataset {dataset!r} is empty")
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for image, label in _loader(_Rendered(dataset), 0, n, 16, workers, pin=False):
        images.append(image)
        labels.append(label)
    return torch.cat(images), torch.cat(labels)


def _pairs(
    images: torch.Tensor, labels: torch.Tensor
) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]:
    return [(images[k].permute(1, 2, 0).numpy(), labels[k].numpy()) for k in range(images.shape[0])]


def _poly_lr(recipe: TrainRecipe, step: int) -> float:
    return float(recipe.lr * (1.0 - step / recipe.steps) ** recipe.poly_power)


def _make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    groups = parameter_groups(model, recipe.amax_lr_scale)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _recipe_dict(recipe: TrainRecipe) -> dict[str, object]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(recipe).items()
    }


def _describe(dataset: SegDataset) -> str:
    """A dataset's repr when it has one of its own (stable across runs), else class and size."""
    text = repr(dataset)
    if " at 0x" in text:
        text = f"{type(dataset).__name__}(size={len(dataset)})"
    return text


def _class_ious(result: MeanIoUResult, names: Sequence[str] | None) -> dict[str, float | None]:
    labels = names if names is not None else [str(k) for k in range(len(result.iou))]
    return {
        name: None if np.isnan(v) else round(float(v), 4)
        for name, v in zip(labels, result.iou, strict=True)
    }


def train_segmentation(
    model_factory: Callable[[], nn.Module],
    dataset: SegDataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    crop: tuple[int, int],
    device: torch.device | str,
    out_dir: Path | str,
    val_dataset: SegDataset | None = None,
    num_classes: int = 19,
    ignore_index: int = 255,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    poly_power: float = 0.9,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    aux_weight: float = 0.4,
    ohem: bool = False,
    ohem_thresh: float = 0.9,
    ohem_min_kept: int = 131072,
    boundary: bool = True,
    boundary_weight: float = 20.0,
    boundary_sem_weight: float = 1.0,
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = True,
    amax_lr_scale: float = 1.0,
    num_workers: int = 0,
    cache: bool = True,
    checkpoint_every: int = 500,
    val_every: int = 500,
    log_every: int = 50,
    eval_train_size: int = 32,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    class_names: Sequence[str] | None = None,
    export: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = inference_state_dict,
    save_weights: Callable[[nn.Module, Path], None] | None = None,
    progress_bar: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model_factory()` on `dataset`, resuming from `out_dir/checkpoint.pt` if present.

    The model must return (aux, main, boundary) logits in training mode (PIDNet with
    `augment=True`) or just main logits. `amp` and `channels_last` apply on CUDA only. Samples
    are rendered in `num_workers` DataLoader workers: once up front into memory when `cache`,
    else on the fly every step. A checkpoint (model, optimizer, step, RNG states, history) is
    written every `checkpoint_every` steps and whenever the run stops early: after global step
    `stop_after`, or when `time_limit_s` of wall time is used up. val mIoU is measured every
    `val_every` steps. At the last step it writes `model_fp16.pt` (the `export`-filtered
    state_dict in fp16, by default the keys of PIDNet with augment=False; `save_weights(model, path)`
    writes it instead when given, e.g. a QAT checkpoint) and `summary.json` (command, recipe,
    train/val mIoU, per-class IoU, hardware, wall time, step time). `progress_bar` shows a tqdm bar.

    Example (GPU, chunks of under ten minutes that resume one another)::

        train_segmentation(
            functools.partial(pidnet_s, num_classes=19, augment=True),
            RoadScenes("train", size=3000, height=256, width=512),
            val_dataset=RoadScenes("val", size=32, height=256, width=512),
            steps=30000, batch_size=16, lr=0.01, crop=(256, 512), ohem=True,
            device="cuda", num_workers=12, out_dir="runs/pidnet-s", time_limit_s=540,
        )
    """
    started = time.monotonic()
    device = torch.device(device)
    cuda = device.type == "cuda"
    recipe = TrainRecipe(
        steps=steps, batch_size=batch_size, lr=lr, crop=(int(crop[0]), int(crop[1])),
        num_classes=num_classes, ignore_index=ignore_index, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, poly_power=poly_power,
        scale_range=(float(scale_range[0]), float(scale_range[1])), flip=flip,
        aux_weight=aux_weight, ohem=ohem, ohem_thresh=ohem_thresh, ohem_min_kept=ohem_min_kept,
        boundary=boundary, boundary_weight=boundary_weight,
        boundary_sem_weight=boundary_sem_weight, seed=seed, amp=amp and cuda,
        channels_last=channels_last and cuda, amax_lr_scale=amax_lr_scale, dataset=_describe(dataset),
        val_dataset="" if val_dataset is None else _describe(val_dataset),
    )  # fmt: skip
    if len(dataset) == 0:
        raise HarnessError(f"training dataset {dataset!r} is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT

    torch.manual_seed(seed)
    model = model_factory().to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = _make_optimizer(model, recipe)
    progress = load_checkpoint(ckpt_path, _recipe_dict(recipe), model, opt, device)
    if progress is not None:
        log(f"resumed {ckpt_path} at step {progress.step}/{steps}")
    progress = progress or Progress()
    step, history, elapsed, train_time = progress.step, progress.history, progress.elapsed_s, progress.train_time_s

    def checkpoint() -> None:
        now = Progress(step, history, elapsed + time.monotonic() - started, train_time)
        save_checkpoint(ckpt_path, _recipe_dict(recipe), model, opt, now, device)

    summary_path = out / SUMMARY
    weights = out / WEIGHTS
    done = finished_run(out, steps, step, log)
    if done is not None:
        return done

    val_pairs = None
    if val_dataset is not None:
        val_pairs = _pairs(*_render_all(val_dataset, num_workers))

    def validate() -> MeanIoUResult | None:
        if val_pairs is None:
            return None
        return evaluate_segmentation(
            model, val_pairs, num_classes, device=device, ignore_index=ignore_index,
            amp=recipe.amp, channels_last=recipe.channels_last,
        )  # fmt: skip

    schedule = Schedule(seed, len(dataset))
    total = steps * batch_size
    store: tuple[torch.Tensor, torch.Tensor] | None = None
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    if step < steps:
        if cache:
            t0 = time.monotonic()
            store = _render_all(dataset, num_workers)
            log(f"rendered {len(dataset)} training samples in {time.monotonic() - t0:.1f} s")
        else:
            items = _Rendered(dataset, schedule.index)
            batches = iter(_loader(items, step * batch_size, total, batch_size, num_workers, cuda))
    if cuda:
        torch.backends.cudnn.benchmark = True
    model.train()
    last = stop_after if stop_after is not None else steps
    bar = step_bar(steps, step, progress_bar, log)
    log = bar.log
    window: list[dict[str, float]] = []
    while step < min(steps, last):
        if time_limit_s is not None and time.monotonic() - started > time_limit_s:
            log(f"time limit {time_limit_s:.0f} s reached at step {step}")
            break
        t_step = time.monotonic()
        gs = range(step * batch_size, (step + 1) * batch_size)
        if store is not None:
            idx = torch.tensor([schedule.index(g) for g in gs])
            images, labels = store[0][idx], store[1][idx]
        else:
            assert batches is not None
            images, labels = next(batches)
        params = np.stack([schedule.params(g) for g in gs])
        x, y = augment(images.to(device, non_blocking=True), labels.to(device), params, recipe)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        set_learning_rate(opt, _poly_lr(recipe, step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.amp):
            outputs = model(x)
        loss, parts = pidnet_loss(outputs, y, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        step += 1
        bar.update()
        train_time += time.monotonic() - t_step
        window.append(parts)
        if step % log_every == 0 or step == steps:
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            mean |= {"step": float(step), "lr": _poly_lr(recipe, step - 1)}
            history.append(mean)
            window = []
            log(
                f"step {step}/{steps} loss {mean['loss']:.4f} lr {mean['lr']:.2e} "
                f"{train_time / max(step, 1):.3f} s/step"
            )
        if val_pairs is not None and step % val_every == 0 and step < steps:
            result = validate()
            assert result is not None
            history.append({"step": float(step), "val_miou": result.miou})
            log(f"step {step} val mIoU {result.miou:.4f}")
        if step % checkpoint_every == 0:
            checkpoint()
    bar.close()
    if step < steps:
        checkpoint()
        return TrainResult(out, step, False, ckpt_path, None, None, {"step": step})
    checkpoint()

    val = validate()
    train_eval = _pairs(*_render_all(dataset, num_workers, limit=eval_train_size))
    train = evaluate_segmentation(
        model, train_eval, num_classes, device=device, ignore_index=ignore_index,
        amp=recipe.amp, channels_last=recipe.channels_last,
    )  # fmt: skip
    if save_weights is None:
        save_atomic(fp16_state(export(model.state_dict())), weights)
    else:
        save_weights(model, weights)
    summary: dict[str, object] = {
        "command": command,
        "steps": steps,
        "recipe": _recipe_dict(recipe),
        "train_miou": round(train.miou, 4),
        "train_eval_size": len(train_eval),
        "val_miou": None if val is None else round(val.miou, 4),
        "val_iou": None if val is None else _class_ious(val, class_names),
        "val_pixel_acc": None if val is None else round(val.pixel_acc, 4),
        "hardware": hardware(device),
        "wall_time_s": round(elapsed + time.monotonic() - started, 1),
        "step_time_s": round(train_time / steps, 4),
        "weights": WEIGHTS,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "history": history,
    }
    write_json_atomic(summary_path, summary)
    val_text = "" if val is None else f", val mIoU {val.miou:.4f}"
    log(f"finished {steps} steps: train mIoU {train.miou:.4f}{val_text}; wrote {weights}")
    return TrainResult(out, step, True, ckpt_path, weights, summary_path, summary)
