"""The editor interface every method implements, and the registry ``--editor NAME`` looks in.

An editor is built from a loaded model and typed hyperparameters (a dataclass validated against
the model), writes facts with :meth:`Editor.edit`, gives the base model back with
:meth:`Editor.restore`, and saves / loads its artifact. Register with :func:`register`::

    @register("neuraldb")
    class NeuralDBEditor(Editor): ...
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from neuraldb.facts import EditRequest
from neuraldb.models import LoadedModel

Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Base class of editor hyperparameters."""

    def validate(self, lm: LoadedModel) -> None:
        """Raise ``ValueError`` when the values do not fit the loaded model."""

    def check_types(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is not of its declared type (a
        value read from a file may be anything): int, float (an int is accepted), str, bool, a
        tuple of ints, each optionally None."""
        for f in dataclasses.fields(self):
            declared = str(f.type).replace(" ", "")
            optional = declared.endswith("|None")
            declared = declared.removesuffix("|None")
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
                  "tuple[int,...]": lambda v: isinstance(v, tuple) and all(
                      isinstance(x, int) and not isinstance(x, bool) for x in v)}.get(declared)
            if ok is not None and not ok(value):
                raise ValueError(f"hyperparameter {f.name} must be {declared}, got {value!r}")

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first number field (or tuple entry) that is NaN or ±inf:
        such a value makes every residual or weight update non-finite."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"hyperparameter {f.name} must be a finite number, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Hparams:
        """A copy with the given fields changed (``None`` values are ignored).

        Raises:
            ValueError: naming a field this editor does not have, and the ones it has.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        names = [f.name for f in dataclasses.fields(self)]
        if unknown := sorted(set(changes) - set(names)):
            raise ValueError(f"{type(self).__name__} has no hyperparameter {', '.join(unknown)}; "
                             f"it has: {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def parse(self, assignments: list[str]) -> Hparams:
        """A copy with ``KEY=VALUE`` strings applied, each value read as the type of the field's
        current value (``layers=3,4,5`` for tuples, ``true``/``false`` for flags)."""
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not hasattr(self, key):
                self.replace(**{key or item: 0})  # raises the error that lists the fields
            changes[key] = _convert(raw.strip(), getattr(self, key), key)
        return self.replace(**changes)


def _convert(raw: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(int(x) for x in raw.split(",") if x.strip())
        return type(current)(raw)
    except ValueError:
        raise ValueError(f"hyperparameter {key}: cannot read {raw!r} as {type(current).__name__}") from None


class Editor(ABC):
    """Writes facts into one loaded model."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type[Hparams]]

    def __init__(self, lm: LoadedModel, hparams: Hparams | None = None):
        self.lm = lm
        self.hparams = hparams if hparams is not None else self.default_hparams(lm)
        self.hparams.check_types()
        self.hparams.check_finite()
        self.hparams.validate(lm)

    @classmethod
    @abstractmethod
    def default_hparams(cls, lm: LoadedModel) -> Hparams:
        """Hyperparameters for this model (a preset for known models, a rule otherwise)."""

    prepare_label = "statistics (tokens)"  # what prepare's progress counts

    def prepare(self, progress: Progress | None = None, start: Callable[[int], None] | None = None) -> None:  # noqa: B027
        """Compute what editing needs before the first fact (e.g. statistics); ``start(total)`` and
        ``progress(done)`` report long work. Nothing by default."""

    @abstractmethod
    def edit(self, requests: list[EditRequest], progress: Progress | None = None) -> None:
        """Write ``requests`` into the model (in place; the editor keeps what ``restore`` needs)."""

    @abstractmethod
    def restore(self) -> None:
        """Give the base model back exactly."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Save the edit artifact (atomically)."""

    @classmethod
    @abstractmethod
    def artifact_model(cls, path: str | Path) -> str | None:
        """The model name recorded in ``path`` when it is this editor's artifact, else None."""

    @classmethod
    @abstractmethod
    def load(cls, lm: LoadedModel, path: str | Path) -> Editor:
        """Load an artifact saved by :meth:`save` and apply it to ``lm`` (refusing a mismatched model)."""


_REGISTRY: dict[str, type[Editor]] = {}
E = TypeVar("E", bound=type[Editor])


def register(name: str) -> Callable[[E], E]:
    def deco(cls: E) -> E:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_editor(name: str) -> type[Editor]:
    _import_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown editor {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def editors() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def identify(path: str | Path) -> tuple[type[Editor], str]:
    """(editor class, model name) of the edit artifact at ``path``.

    Raises:
        ArtifactError: when no registered editor recognises it.
    """
    from neuraldb.files import ArtifactError

    _import_builtin()
    for cls in _REGISTRY.values():
        model = cls.artifact_model(path)
        if model is not None:
            return cls, model
    raise ArtifactError(f"{path} is not an edit artifact of any editor ({', '.join(sorted(_REGISTRY))})")


def _import_builtin() -> None:
    import importlib

    for module in ("neuraldb.neuraldb_editor", "baselines"):
        importlib.import_module(module)
