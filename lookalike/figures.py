"""Writing matplotlib figures to files: one place for the folder, the format and the resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path | str, dpi: int = 100) -> Path:
    """Save ``fig`` as ``path`` (PNG by its suffix), making its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
