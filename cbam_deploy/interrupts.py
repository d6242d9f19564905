"""Ctrl-C: one way out at any moment, exit code 130 and one line, whatever library is running.

The entry point installs ``on_sigint`` before it imports anything heavy. The handler remembers the
interrupt and raises ``KeyboardInterrupt`` as Python's own does; a library that catches it (a bare
``except:``, an import machinery that turns it into an ``ImportError``) cannot make it go away,
because the CLI looks at ``interrupted()`` whatever the command ended with, and every place that
makes a result visible (a bundle commit, a staged folder swapped in) calls ``raise_if_interrupted``
first. A second Ctrl-C ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODE = 130
MESSAGE = "interrupted: every bundle and output is as it was before, or fully updated (never half-written)"

_state = {"count": 0, "said": False}


def on_sigint(signum, frame) -> None:
    _state["count"] += 1
    if _state["count"] > 1:  # asked twice: no more waiting for a library to unwind
        try:
            if first_to_say():
                os.write(2, (MESSAGE + "\n").encode())
        finally:
            os._exit(EXIT_CODE)
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT to ``on_sigint`` (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed since the process started (or since ``reset``)."""
    return _state["count"] > 0


def reset() -> None:
    """Forget a Ctrl-C that was handled as the normal way to stop (a server's Ctrl-C)."""
    _state["count"], _state["said"] = 0, False


def first_to_say() -> bool:
    """True the first time it is asked: the one line is printed once, by whoever gets there first."""
    said, _state["said"] = _state["said"], True
    return not said


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C arrived that something swallowed: nothing may be
    committed after it."""
    if _state["count"]:
        raise KeyboardInterrupt


def leave() -> None:
    """End an interrupted process now: the one line (unless printed already), the streams flushed, exit
    code 130. ``os._exit``, not ``sys.exit``: once a ``KeyboardInterrupt`` has passed through code the
    interpreter ran on its own (an import, a library's exec), a normal interpreter exit can end the
    process by SIGINT (exit -2) even though the interrupt was handled; by now every staged output has
    been removed or committed on the way up."""
    if first_to_say():
        try:
            sys.stderr.write(MESSAGE + "\n")
        except (OSError, ValueError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_CODE)
