"""The error for a data row that cannot be used, shared by the loader and the format readers."""
from __future__ import annotations


class DataError(ValueError):
    """A data row that cannot be used; the message names the file, the line and the field."""


def short(value: object, limit: int = 200) -> str:
    """repr of a value for an error message, cut short: rows can hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
