"""Where local data lives: the folder named by ``$NEURALDB_DATA`` (never a hub at run time)."""

from __future__ import annotations

import os
from pathlib import Path


class DataNotFoundError(FileNotFoundError):
    """A data file the command needs is not under ``$NEURALDB_DATA``."""


def data_dir() -> Path:
    """``$NEURALDB_DATA``, or ``../shared/data`` beside the checkout when unset."""
    env = os.environ.get("NEURALDB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(relative: str) -> Path:
    """``data_dir() / relative``, which must exist."""
    path = data_dir() / relative
    if not path.is_file():
        raise DataNotFoundError(f"{relative} not found under {data_dir()} (set NEURALDB_DATA to the data folder)")
    return path
