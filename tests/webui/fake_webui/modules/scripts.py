"""Fake ``modules.scripts``: ``basedir()`` is the extension dir while its scripts are imported."""

current_basedir = ""


def basedir() -> str:
    return current_basedir
