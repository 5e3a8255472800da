"""One exception hierarchy whose messages name the file, key, tensor or layer at fault."""

from __future__ import annotations

from pathlib import Path


class HarnessError(Exception):
    """Base of every error qharness raises on purpose."""


class CaseError(HarnessError):
    """A case file is invalid: the message names the file, the line and the key."""

    def __init__(self, path: Path | str, message: str, *, line: int | None = None, key: str | None = None):
        self.path = Path(path)
        self.line = line
        self.key = key
        self.detail = message
        super().__init__(self.render(self.path))

    def render(self, shown_path: Path | str) -> str:
        """The message with the file shown as `shown_path` (e.g. relative to the project root)."""
        where = str(shown_path) if self.line is None else f"{shown_path}:{self.line}"
        what = f"key '{self.key}': " if self.key else ""
        return f"{where}: {what}{self.detail}"


class TensorFileError(HarnessError):
    """A tensor file cannot be read or written: the message names the file and the field."""

    def __init__(self, path: Path | str, message: str, *, field: str | None = None):
        self.path = Path(path)
        self.field = field
        what = f" [{field}]" if field else ""
        super().__init__(f"{self.path}{what}: {message}")


class GoldenError(HarnessError):
    """Golden files are missing or stale; the message says how to regenerate them."""


class BackendUnavailable(HarnessError):
    """A backend cannot run here; the message is the skip reason shown to the user."""


class QuantError(HarnessError):
    """Quantization failed (calibration, amax, export); the message names the quantizer(s)."""


class ExportError(HarnessError):
    """A model could not be exported or the exported graph is invalid."""


class MetricError(HarnessError):
    """Metric inputs are invalid; the message names the sample, box or tensor."""
