"""Paths shared by every command; environment variables override defaults, command-line
flags override environment variables. (Defaults and file names: `croft_search.contract`.)"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of every cache this tool writes (`CROFT_CACHE`, default ~/.cache/croft_search)."""
    return Path(os.environ.get("CROFT_CACHE", Path.home() / ".cache" / "croft_search")).expanduser()


def data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """Dataset root: `--data-root`, else `CROFT_DATA`, else `<cache>/data` (where the
    embedded digits benchmark is built)."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get("CROFT_DATA"):
        return Path(os.environ["CROFT_DATA"]).expanduser()
    return cache_root() / "data"


def feature_cache_dir() -> Path:
    return cache_root() / "features"


def model_dir() -> Path:
    """Where downloaded open_clip weights go (only used where a network exists)."""
    return cache_root() / "models"
