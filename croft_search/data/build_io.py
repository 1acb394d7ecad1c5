"""Writing a generated dataset so readers never see half of it: build into a staging
folder under the same root, then move finished folders into place under a lock."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

try:  # POSIX only; elsewhere concurrent builders are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise builders of the same root (e.g. several Ray workers starting at once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_staging(root: Path, prefix: str) -> None:
    """Staging folders left by killed builds (only call while holding the lock)."""
    for stale in root.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(staging: Path, root: Path, folders: Sequence[str], manifest: Path) -> None:
    """Move `staging/<folder>` to `root/<folder>` for each folder, replacing what is there.

    `manifest` (under root) marks a complete build. It is deleted before anything moves
    and must arrive inside the last folder, so an interruption at any point leaves no
    manifest, which the builder reads as "not built". Replaced folders are moved aside
    (into staging, deleted with it) rather than deleted in place, so `root/<folder>` is
    never half-deleted.
    """
    manifest.unlink(missing_ok=True)
    replaced = staging / ".replaced"
    replaced.mkdir(exist_ok=True)
    for folder in folders:
        destination = root / folder
        if destination.exists():
            destination.rename(replaced / folder)
        (staging / folder).rename(destination)
