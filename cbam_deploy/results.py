"""What every command returns: one result object with ``passed``, ``exit_code`` and ``to_json()``.

The CLI prints ``to_json()`` under ``--json``, renders the rest, and exits with ``exit_code``; a
notebook reads the same object. A result is also a read-only mapping of its JSON document, so
``result["results"]`` reads as the document does; each command's result class adds typed properties
for what a caller usually wants (its artifacts, its verdicts, its figures).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_FAILED_CHECK = 3  # an artifact was written but failed its parity or verify check; info: a file changed


def plain(value: Any) -> Any:
    """``value`` as JSON data: results, paths, numpy scalars and arrays, tuples made plain."""
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Result(Mapping):
    """A command's result (see the module doc). Subclasses set ``command`` and may refine ``exit_code``
    and ``failure``."""

    command = ""

    def __init__(self, data: dict) -> None:
        self._data = data

    @property
    def passed(self) -> bool | None:
        """True when every check passed, False when one failed, None when nothing was judged."""
        return self._data.get("passed")

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_CHECK if self.passed is False else EXIT_OK

    @property
    def failure(self) -> str | None:
        """The one line that says what failed (None when nothing did)."""
        return f"{self.command or 'the check'} failed" if self.passed is False else None

    def to_json(self) -> dict:
        return plain(self._data)

    def add(self, key: str, value: Any) -> None:
        """Add a part to the result (for the command that composes it from its steps)."""
        self._data[key] = value

    def remove(self, key: str) -> Any:
        """Take a part out of the result (for the command that composes it); its value."""
        return self._data.pop(key)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} passed={self.passed!r} {sorted(self._data)}>"
