"""User-facing errors: each names the file, row or field at fault and what to do about it.

The CLI prints a `CaiRayError` as one readable message and exits 2, never with a traceback.
"""

from __future__ import annotations


class CaiRayError(Exception):
    """An error the user can fix. `where` names the file/row/field, `hint` says what to do."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class ConfigError(CaiRayError):
    """A run config (YAML file or --set override) that is invalid."""


class ConstitutionError(CaiRayError):
    """A constitution file that cannot be loaded, validated or imported."""


class DataError(CaiRayError):
    """A prompt/comparison source that cannot be read at all (bad rows are rejects, not errors)."""


class ModelError(CaiRayError):
    """A model path or preset that cannot be loaded."""


def find_user_error(exc: BaseException | None) -> CaiRayError | None:
    """The CaiRayError under the exceptions Ray wraps a task's failure in (`cause`, `__cause__`,
    `__context__`), so the user sees their own error without a traceback; None if there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CaiRayError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
