"""``muted()``: silence what third-party code prints (the ONNX exporter's progress notes, NNCF's progress bars) for
the calling thread only.

``contextlib.redirect_stdout`` swaps ``sys.stdout`` for the whole process: two threads that overlap restore each
other's buffer, and ``sys.stdout`` stays a ``StringIO`` for good (every later ``print`` lost; seen with two
``compile`` calls in two threads), while every other thread's output is swallowed meanwhile. Here, while any thread
is muted, ``sys.stdout`` (``sys.stderr``) is a filter that drops that thread's writes and passes every other
thread's to the stream it stands for; the last muted thread to leave puts the stream back.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_muted: dict[str, collections.Counter] = {"stdout": collections.Counter(), "stderr": collections.Counter()}


class _Filter:
    """Stands for ``sys.<name>`` while some thread is muted (module docstring)."""

    def __init__(self, name: str, stream) -> None:
        self._name, self.stream = name, stream

    def _mine(self) -> bool:
        return threading.get_ident() in _muted[self._name]

    def write(self, text: str) -> int:
        return len(text) if self._mine() else self.stream.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._mine():
            self.stream.flush()

    def __getattr__(self, attr: str):  # isatty, fileno, encoding, ...: the stream's
        return getattr(self.stream, attr)


@contextlib.contextmanager
def muted(stdout: bool = True, stderr: bool = False) -> Iterator[None]:
    """Drop what this thread writes to ``sys.stdout`` (and ``sys.stderr``) within the block; other threads' output
    goes through. Nests; thread-safe."""
    names = [name for name, on in (("stdout", stdout), ("stderr", stderr)) if on]
    me = threading.get_ident()
    with _lock:
        for name in names:
            if not _muted[name] and not isinstance(getattr(sys, name), _Filter):
                setattr(sys, name, _Filter(name, getattr(sys, name)))
            _muted[name][me] += 1
    try:
        yield
    finally:
        with _lock:
            for name in names:
                _muted[name][me] -= 1
                if _muted[name][me] <= 0:
                    del _muted[name][me]
                current = getattr(sys, name)
                if not _muted[name] and isinstance(current, _Filter):  # else someone replaced it meanwhile: theirs
                    setattr(sys, name, current.stream)
