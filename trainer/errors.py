"""The error hierarchy: every user-facing failure names the field or path and the fix."""

from __future__ import annotations


class TrainTrainError(Exception):
    """Base class for errors that are shown to the user as one clear line."""


class SettingsError(TrainTrainError):
    """A setting has a value we cannot use.

    Args:
        key: the exact settings key (reference JSON name), e.g. ``train_optimizer``.
        message: what is wrong and how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class InputError(TrainTrainError):
    """A file or folder given by the user cannot be used.

    Args:
        path: the offending path (or a field name when there is no path).
        message: what is wrong and how to fix it.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class MissingPackage(TrainTrainError):
    """An optional package needed by one feature is not installed.

    Args:
        package: the pip package name.
        feature: the feature that needs it, e.g. ``train_optimizer 'CAME'``.
    """

    def __init__(self, package: str, feature: str) -> None:
        self.package = package
        self.feature = feature
        super().__init__(f"{feature} needs the '{package}' package: pip install {package}")


class StopTraining(TrainTrainError):
    """Raised inside the step loop to end a run early (non-finite loss and the like)."""


class ValidationError(TrainTrainError):
    """Several settings problems found at once (R3); the message has one line per problem.

    Args:
        problems: the individual errors, each naming its field and the fix.
    """

    def __init__(self, problems: list[TrainTrainError]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
