"""Typed errors with messages that name the cause and the fix.

Every error a user can cause derives from :class:`SpmlError`; the CLI prints it without a
traceback and exits with :attr:`SpmlError.exit_code` (2).
"""
from __future__ import annotations

from pathlib import Path


class SpmlError(Exception):
    """A user-facing error: what is wrong, where, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class DatasetError(SpmlError):
    """The dataset folder does not follow the dataset contract."""


class ImageReadError(SpmlError):
    """An image file is missing, unreadable, corrupt or too large."""


class ConfigError(SpmlError):
    """A configuration value or key is invalid."""


class ManifestError(SpmlError):
    """A run folder or bundle (spml.json and the files it lists) is missing or corrupt."""


class TrainingError(SpmlError):
    """Training cannot go on (non-finite loss, missing annotation kind, ...)."""


class ExportError(SpmlError):
    """Export or a parity check failed."""


class BackendError(SpmlError):
    """An inference backend cannot be created or run as asked."""


class MissingDependencyError(SpmlError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, purpose: str, fix: str | None = None):
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed",
            fix=fix or f"pip install 'spml-deploy[{extra}]'",
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise :class:`MissingDependencyError` with the pip line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised where the extra is absent
        raise MissingDependencyError(module, extra, purpose) from exc
