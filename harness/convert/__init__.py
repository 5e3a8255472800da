"""Converters from official checkpoints to the zoo's state dicts (`qharness convert`).

One module per model family (`pidnet`, `fastbev`, `bevfusion`, `centerpoint`), shared helpers in
`base`, the converters by name in `registry`. See docs/checkpoints.md.
"""

SUMMARIES: dict[str, str] = {
    "pidnet": "official PIDNet-S (Cityscapes / CamVid) -> pidnet-s case",
    "cuda-fastbev": "CUDA-FastBEV FastBEV-R18 -> fastbev-r18 case",
    "cuda-bevfusion-r50": "CUDA-BEVFusion ResNet50 (camera branch, fuser, decoder) -> bevfusion-camera case",
    "centerpoint": "det3d CenterPoint SCN (spconv 1.x) -> centerpoint-scn case, BN fused",
}
"""What each converter takes and gives, importable without torch (the CLI's help)."""

NAMES: tuple[str, ...] = tuple(SUMMARIES)
"""The converter names (the CLI's choices); `registry.CONVERTERS` has one entry each."""
