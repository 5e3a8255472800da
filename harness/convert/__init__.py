"""Converters from official checkpoints to the zoo's state dicts (`qharness convert`).

One module per model family (`pidnet`, `fastbev`, `bevfusion`, `centerpoint`), shared helpers in
`base`, the converters by name in `registry`. See docs/checkpoints.md.
"""

NAMES: tuple[str, ...] = ("pidnet", "cuda-fastbev", "cuda-bevfusion-r50", "centerpoint")
"""The converter names, importable without torch (the CLI's choices); `registry.CONVERTERS` has
one entry each."""
