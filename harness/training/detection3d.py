"""Seeded, resumable training of FastBEV-style camera BEV detectors on multi-camera scenes.

The loop: six normalised images per sample -> `extract_image_features` -> the view transform with
the lookup tables of the sample's `lidar2img` (computed once per distinct camera rig) ->
`head_forward` -> `loss_from_targets` (focal class loss, smooth-L1 box deltas, direction
cross-entropy over anchors assigned by IoU). AdamW (fused on CUDA) with linear warm-up and cosine
decay, gradient clipping at 35 (FastBEV's `grad_clip`); AMP (bfloat16) and channels_last on CUDA.

Data: samples (`harness.datasets.scenes.SceneSample`: uint8 images, `lidar2img`, `Box3D`s) are
rendered in DataLoader workers, which also assign the anchors of each sample (the assignment
depends only on the ground truth and the fixed anchors). With `cache` (default) every training
sample is rendered and assigned once up front and kept in memory -- on the GPU when it fits in
`device_cache_gb`, else in pinned host memory -- so a step touches no Python data code; without
it, samples are rendered on the fly every step.

Every sample the loop sees is a function of (seed, global sample number) only: the order is a
per-epoch permutation seeded by (seed, epoch). A run stopped anywhere (`stop_after`,
`time_limit_s`, a crash after a checkpoint) and resumed from `out_dir/checkpoint.pt` continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.atomic import write_json_atomic
from harness.errors import HarnessError
from harness.metrics import nds
from harness.tasks.detection3d import ground_truth_boxes, prediction_boxes
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
from harness.zoo.fastbev import (
    FastBEV,
    GTBoxes,
    HeadOutputs,
    LookupTables,
    LossTargets,
    NMSConfig,
    loss_targets,
    nms_config,
    normalize_images,
    postprocess,
    view_transform,
)

__all__ = ["DetRecipe", "evaluate_detection3d", "train_detection3d"]


class SceneLike(Protocol):
    """What a dataset item must offer (e.g. `harness.datasets.scenes.SceneSample`)."""

    @property
    def token(self) -> str: ...

    @property
    def images(self) -> npt.NDArray[np.uint8]: ...

    @property
    def lidar2img(self) -> npt.NDArray[np.float32]: ...

    @property
    def boxes(self) -> tuple[Any, ...]: ...


class SceneDataset(Protocol):
    """A sized, indexable collection of `SceneLike` samples (e.g. `DrivingScenes`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SceneLike: ...


@dataclass(frozen=True)
class DetRecipe:
    """Everything that decides the trained weights; a resumed run must present the same."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_steps: int = 300
    min_lr_ratio: float = 0.01
    grad_clip: float = 35.0
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
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip <= 0:
            raise HarnessError(
                f"training needs warmup_steps >= 0, 0 <= min_lr_ratio <= 1, grad_clip > 0; got "
                f"{self.warmup_steps}, {self.min_lr_ratio}, {self.grad_clip}"
            )


def learning_rate(recipe: DetRecipe, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(recipe.steps - recipe.warmup_steps, 1)
    progress = min((step - recipe.warmup_steps) / span, 1.0)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Item:
    """One rendered training sample as tensors (what DataLoader workers send back)."""

    images: torch.Tensor
    """uint8 [Ncam, 3, H, W]"""
    lidar2img: torch.Tensor
    """float32 [Ncam, 4, 4]"""
    targets: LossTargets
    """anchor assignment (int16) and GT labels / boxes"""
    gt: GTBoxes


@dataclass(frozen=True)
class ItemBatch:
    """A collated batch of `Item`s."""

    images: torch.Tensor
    """uint8 [B, Ncam, 3, H, W] (on the GPU when the cache is)"""
    lidar2img: torch.Tensor
    """float32 [B, Ncam, 4, 4], always on the CPU (tables are looked up by its bytes)"""
    targets: tuple[LossTargets, ...]


def collate_items(items: Sequence[Item]) -> ItemBatch:
    """Stack images and camera matrices, keep per-sample targets (the DataLoader's collate)."""
    return ItemBatch(
        images=torch.stack([it.images for it in items]),
        lidar2img=torch.stack([it.lidar2img for it in items]),
        targets=tuple(it.targets for it in items),
    )


class _Rendered(Dataset[Item]):
    """Dataset items as `Item`s with their anchor assignment; item i is dataset item
    `index(i)`. Rendering and assignment happen wherever this is indexed (DataLoader workers)."""

    def __init__(
        self,
        dataset: SceneDataset,
        anchors: torch.Tensor,
        model: FastBEV,
        index: Callable[[int], int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.anchors = anchors.cpu()
        self.loss_config = model.loss_config
        self.num_classes = model.config.num_classes
        self.index = index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item:
        sample = self.dataset[i if self.index is None else self.index(i)]
        gt = GTBoxes.from_boxes(sample.boxes)
        targets = loss_targets(self.anchors, gt, self.loss_config, self.num_classes)
        compact = LossTargets(targets.assigned.to(torch.int16), targets.labels, targets.boxes)
        images = torch.from_numpy(np.ascontiguousarray(sample.images.transpose(0, 3, 1, 2)))
        return Item(images, torch.from_numpy(np.asarray(sample.lidar2img, np.float32)), compact, gt)


def _loader(items: Dataset[Item], start: int, stop: int, batch_size: int, workers: int,
            pin: bool) -> DataLoader[Item]:
    return DataLoader(
        items, batch_size=batch_size, sampler=RangeSampler(start, stop), num_workers=workers,
        pin_memory=pin, collate_fn=collate_items, worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )  # fmt: skip


@dataclass
class _Store:
    """Every training sample rendered and assigned once: images and targets on the device or
    (images pinned) on the host; camera matrices on the host."""

    images: torch.Tensor
    lidar2img: torch.Tensor
    targets: list[LossTargets]

    def batch(self, index: Sequence[int]) -> ItemBatch:
        idx = torch.tensor(list(index))
        return ItemBatch(self.images[idx.to(self.images.device)], self.lidar2img[idx],
                         tuple(self.targets[i] for i in index))


def _render_all(dataset: SceneDataset, items: Dataset[Item], workers: int,
                limit: int | None = None) -> list[Item]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out: list[Item] = []
    loader = DataLoader(items, batch_size=None, sampler=RangeSampler(0, n), num_workers=workers,
                        worker_init_fn=worker_init if workers else None)
    # Tensors from workers live in shared memory, one file descriptor each; keeping thousands of
    # samples would exhaust the descriptor limit, so each one is copied into ordinary memory.
    out.extend(_clone_tree(item) for item in loader)
    return out


def _clone_tree(value: Any) -> Any:
    """`value` with every tensor inside (dataclass fields, recursively) cloned."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone_tree(getattr(value, f.name))
                                              for f in dataclasses.fields(value)})
    return value


def _store(items: list[Item], device: torch.device, device_cache_gb: float) -> _Store:
    images = torch.stack([it.images for it in items])
    lidar2img = torch.stack([it.lidar2img for it in items])
    targets = [it.targets for it in items]
    if device.type == "cuda":
        if images.numel() / 1e9 + sum(t.assigned.numel() * 2 for t in targets) / 1e9 <= device_cache_gb:
            return _Store(images.to(device), lidar2img,
                          [LossTargets(t.assigned.to(device), t.labels.to(device), t.boxes.to(device))
                           for t in targets])
        images = images.pin_memory()
    return _Store(images, lidar2img, targets)


# ----------------------------------------------------------------------------------------------
# Model glue


class _Tables:
    """Lookup tables per distinct `lidar2img` (one camera rig: computed once)."""

    def __init__(self, model: FastBEV) -> None:
        self.model = model
        self._tables: dict[bytes, LookupTables] = {}

    def __call__(self, lidar2img: torch.Tensor, device: torch.device) -> LookupTables:
        key = lidar2img.detach().cpu().numpy().astype(np.float32).tobytes()
        if key not in self._tables:
            with torch.no_grad():
                tables = self.model.lookup_tables(lidar2img.detach().cpu().to(torch.float32))
            self._tables[key] = LookupTables(*(t.to(device) for t in tables))
        return self._tables[key]


def forward(model: FastBEV, images: torch.Tensor, tables: Sequence[LookupTables],
            channels_last: bool = False) -> HeadOutputs:
    """Head maps for normalised images [B, Ncam, 3, H, W] with one set of tables per sample."""
    batch, ncam = images.shape[:2]
    x = images.flatten(0, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    feats = model.extract_image_features(x)
    feats = feats.reshape(batch, ncam, *feats.shape[1:])
    volumes = [view_transform(feats[b], *tables[b], model.config.grid) for b in range(batch)]
    out: HeadOutputs = model.head_forward(torch.cat(volumes, dim=0))
    return out


def evaluate_detection3d(
    model: FastBEV,
    samples: Sequence[SceneLike],
    *,
    device: torch.device | str = "cpu",
    nms: NMSConfig | None = None,
    filter_range: bool = True,
    batch_size: int = 4,
    amp: bool = False,
    channels_last: bool = False,
) -> nds.NDSResult:
    """nuScenes metrics of `model` (eval mode) over `samples`: forward, the seed's top-k decode,
    scale-NMS and `harness.metrics.nds.evaluate`, exactly as the detection3d task scores a case."""
    device = torch.device(device)
    tables = _Tables(model)
    was_training = model.training
    model.eval()
    gt: dict[str, list[dict[str, Any]]] = {}
    pred: dict[str, list[dict[str, Any]]] = {}
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = torch.from_numpy(np.stack([s.images.transpose(0, 3, 1, 2) for s in chunk]))
            x = normalize_images(images.to(device))
            per = [tables(torch.from_numpy(np.asarray(s.lidar2img)), device) for s in chunk]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = forward(model, x, per, channels_last)
            for b, sample in enumerate(chunk):
                single = HeadOutputs(*(t[b : b + 1].float() for t in outputs))
                cls_score, bbox_pred, dirs = model.select_and_decode(single)
                dets = postprocess(cls_score.cpu().numpy(), bbox_pred.cpu().numpy(), dirs.cpu().numpy(), nms)
                pred[sample.token] = prediction_boxes(dets)
                gt[sample.token] = ground_truth_boxes(sample.boxes)
    model.train(was_training)
    return nds.evaluate(gt, pred, filter_range=filter_range)


# ----------------------------------------------------------------------------------------------
# The loop


def _describe(dataset: SceneDataset) -> str:
    """A dataset's repr when it has one of its own (stable across runs), else class and size."""
    text = repr(dataset)
    if " at 0x" in text:
        fields = {k: v for k, v in sorted(vars(dataset).items())
                  if not k.startswith("_") and isinstance(v, str | int | float | bool)}
        fields.setdefault("size", len(dataset))
        text = f"{type(dataset).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
    return text


def _recipe_dict(recipe: DetRecipe) -> dict[str, object]:
    return dataclasses.asdict(recipe)


def _nds_summary(result: nds.NDSResult | None) -> dict[str, Any]:
    if result is None:
        return {"NDS": None, "mAP": None}
    full = result.to_dict()
    out: dict[str, Any] = {k: round(float(full[k]), 4) for k in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")}
    out["AP"] = {name: round(m.ap, 4) for name, m in result.per_class.items()}
    return out


def train_detection3d(
    model_factory: Callable[[], nn.Module],
    dataset: SceneDataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device | str,
    out_dir: Path | str,
    val_dataset: SceneDataset | None = None,
    weight_decay: float = 0.01,
    warmup_steps: int = 300,
    min_lr_ratio: float = 0.01,
    grad_clip: float = 35.0,
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = True,
    amax_lr_scale: float = 1.0,
    num_workers: int = 0,
    cache: bool = True,
    device_cache_gb: float = 16.0,
    checkpoint_every: int = 500,
    val_every: int = 1000,
    val_size: int | None = None,
    log_every: int = 50,
    eval_train_size: int = 32,
    nms: Mapping[str, Any] | None = None,
    filter_range: bool = True,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    save_weights: Callable[[nn.Module, Path], None] | None = None,
    progress_bar: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model_factory()` (a `FastBEV`) on `dataset`, resuming from `out_dir/checkpoint.pt`.

    `amp` and `channels_last` apply on CUDA only. Samples are rendered (and their anchors
    assigned) in `num_workers` DataLoader workers: once up front when `cache` (kept on the GPU
    if they fit in `device_cache_gb`), else on the fly every step. A checkpoint (model,
    optimizer, step, RNG states, history) is written every `checkpoint_every` steps and whenever
    the run stops early: after global step `stop_after`, or when `time_limit_s` of wall time is
    used up. Validation NDS / mAP (the first `val_size` samples of `val_dataset`, default all)
    every `val_every` steps, with `nms` (fields of `NMSConfig`) and `filter_range` as the case's
    metric. At the last step it writes `model_fp16.pt` (the state_dict in fp16, loadable
    strictly into the case's factory; `save_weights(model, path)` writes it instead when given,
    e.g. a QAT checkpoint) and `summary.json` (command, recipe, losses, train / val NDS, mAP, TP
    errors and per-class AP, hardware, wall time, step time). `progress_bar` shows a tqdm bar.

    Example (one H100, the CI profile of cases/fastbev_r18.yaml)::

        qharness train cases/fastbev_r18.yaml --out runs/fastbev-r18 --device cuda --workers 12
    """
    started = time.monotonic()
    device = torch.device(device)
    cuda = device.type == "cuda"
    recipe = DetRecipe(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, grad_clip=grad_clip, seed=seed,
        amp=amp and cuda, channels_last=channels_last and cuda, amax_lr_scale=amax_lr_scale, dataset=_describe(dataset),
        val_dataset="" if val_dataset is None else _describe(val_dataset),
    )  # fmt: skip
    if len(dataset) == 0:
        raise HarnessError(f"training dataset {dataset!r} is empty")
    try:
        nms_settings = nms_config(nms or {})
    except ValueError as exc:
        raise HarnessError(f"train_detection3d: {exc}") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT

    torch.manual_seed(seed)
    built = model_factory()
    if not isinstance(built, FastBEV):
        raise HarnessError(f"train_detection3d trains FastBEV models, the factory built {type(built).__name__}")
    model: FastBEV = built.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(parameter_groups(model, amax_lr_scale), lr=lr, weight_decay=weight_decay,
                            fused=cuda or None)
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

    val_samples: list[SceneLike] | None = None
    if val_dataset is not None:
        count = len(val_dataset) if val_size is None else min(val_size, len(val_dataset))
        val_samples = [val_dataset[i] for i in range(count)]

    def validate() -> nds.NDSResult | None:
        if val_samples is None:
            return None
        return evaluate_detection3d(
            model, val_samples, device=device, nms=nms_settings, filter_range=filter_range,
            amp=recipe.amp, channels_last=recipe.channels_last,
        )  # fmt: skip

    schedule = Schedule(seed, len(dataset))
    tables = _Tables(model)
    total = steps * batch_size
    store: _Store | None = None
    batches: Iterator[ItemBatch] | None = None
    if step < steps:
        if cache:
            t0 = time.monotonic()
            store = _store(_render_all(dataset, _Rendered(dataset, model.anchors, model), num_workers),
                           device, device_cache_gb)
            where = "on the GPU" if store.images.device.type == "cuda" else "in host memory"
            log(f"rendered {len(dataset)} training samples in {time.monotonic() - t0:.1f} s, kept {where}")
        else:
            items = _Rendered(dataset, model.anchors, model, schedule.index)
            batches = iter(_loader(items, step * batch_size, total, batch_size, num_workers, cuda))
    if cuda:
        torch.backends.cudnn.benchmark = True
    model.train()
    last = stop_after if stop_after is not None else steps
    bar = step_bar(steps, step, progress_bar, log)
    log = bar.log
    window: list[dict[str, torch.Tensor]] = []
    while step < min(steps, last):
        if time_limit_s is not None and time.monotonic() - started > time_limit_s:
            log(f"time limit {time_limit_s:.0f} s reached at step {step}")
            break
        t_step = time.monotonic()
        if store is not None:
            batch = store.batch([schedule.index(g) for g in range(step * batch_size, (step + 1) * batch_size)])
        else:
            assert batches is not None
            batch = next(batches)
        x = normalize_images(batch.images.to(device, non_blocking=True))
        per = [tables(batch.lidar2img[b], device) for b in range(batch.lidar2img.shape[0])]
        set_learning_rate(opt, learning_rate(recipe, step))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.amp):
            outputs = forward(model, x, per, recipe.channels_last)
        losses = model.loss_from_targets(HeadOutputs(*(t.float() for t in outputs)), batch.targets)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        step += 1
        bar.update()
        train_time += time.monotonic() - t_step
        window.append({k: v.detach() for k, v in losses.items()})  # no device sync per step
        if step % log_every == 0 or step == steps:
            mean = {k: float(torch.stack([w[k] for w in window]).mean()) for k in window[0]}
            mean |= {"step": float(step), "lr": learning_rate(recipe, step - 1)}
            history.append(mean)
            window = []
            log(f"step {step}/{steps} loss {mean['loss']:.4f} (cls {mean['loss_cls']:.4f} bbox "
                f"{mean['loss_bbox']:.4f} dir {mean['loss_dir']:.4f}) lr {mean['lr']:.2e} "
                f"{train_time / max(step, 1):.3f} s/step")
        if val_samples is not None and step % val_every == 0 and step < steps:
            result = validate()
            assert result is not None
            history.append({"step": float(step), "val_nds": result.NDS, "val_map": result.mAP})
            log(f"step {step} val NDS {result.NDS:.4f} mAP {result.mAP:.4f}")
        if step % checkpoint_every == 0:
            checkpoint()
    bar.close()
    if step < steps:
        checkpoint()
        return TrainResult(out, step, False, ckpt_path, None, None, {"step": step})
    checkpoint()

    val = validate()
    train_samples = [dataset[i] for i in range(min(eval_train_size, len(dataset)))]
    train = evaluate_detection3d(
        model, train_samples, device=device, nms=nms_settings, filter_range=filter_range,
        amp=recipe.amp, channels_last=recipe.channels_last,
    )  # fmt: skip
    if save_weights is None:
        save_atomic(fp16_state(model.state_dict()), weights)
    else:
        save_weights(model, weights)
    losses_logged = [h for h in history if "loss" in h]
    summary: dict[str, object] = {
        "command": command,
        "steps": steps,
        "recipe": _recipe_dict(recipe),
        "first_loss": losses_logged[0]["loss"] if losses_logged else None,
        "final_loss": losses_logged[-1]["loss"] if losses_logged else None,
        "train": _nds_summary(train),
        "train_eval_size": len(train_samples),
        "val": _nds_summary(val),
        "val_size": 0 if val_samples is None else len(val_samples),
        "hardware": hardware(device),
        "wall_time_s": round(elapsed + time.monotonic() - started, 1),
        "step_time_s": round(train_time / steps, 4),
        "weights": WEIGHTS,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "history": history,
    }
    write_json_atomic(summary_path, summary)
    val_text = "" if val is None else f", val NDS {val.NDS:.4f} mAP {val.mAP:.4f}"
    log(f"finished {steps} steps: train NDS {train.NDS:.4f}{val_text}; wrote {weights}")
    return TrainResult(out, step, True, ckpt_path, weights, summary_path, summary)
