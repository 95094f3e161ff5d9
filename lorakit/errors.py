"""Errors lorakit raises on purpose. Each says what is wrong, where, and what to do."""


class LorakitError(Exception):
    """Base class: anything lorakit rejects with an explanation."""


class PeftWarning(UserWarning):
    """The warnings PEFT gives as its PeftWarning, under the same name (`from lorakit import PeftWarning`), so
    `pytest.warns(PeftWarning)` and warning filters written for PEFT keep working."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid. Lists every problem found, not just the first."""

    def __init__(self, problems: list[str] | str, where: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where}:\n{lines}")


class TargetError(LorakitError, ValueError):
    """target_modules (or modules_to_save) names something the model does not have."""


class AdapterError(LorakitError, ValueError):
    """An adapter folder is missing, malformed, or does not fit the base model (a ValueError, as PEFT raises)."""


class DataError(LorakitError, ValueError):
    """A data file or row is unusable. Names the file, the line and the problem."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path, self.line = path, line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


class ModelLoadError(LorakitError):
    """A model name or path cannot be loaded (offline, missing, unsupported)."""


class DiskFullError(LorakitError, OSError):
    """A write failed because its file system is full (or over quota, or failing): one message naming the
    folder, its free space and what the write needed, instead of a library's traceback. An OSError too, so
    code that tolerates a failed write (a plot on the way out of a crash) still does."""


class ExportError(LorakitError, ValueError):
    """An adapter or model cannot be exported to the format or engine asked for; says what to do instead."""
