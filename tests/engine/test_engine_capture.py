"""The capture's streams (engine/cuda/capture.py) on the CPU: the capture and the body stream always differ,
whatever the stream pool hands out, and a one-stream pool fails with the fix. The capture itself needs a GPU
(tests/engine/test_engine_gpu.py)."""

from __future__ import annotations

import pytest

from adaptive_kernels.engine.cuda.capture import capture_streams


class _StreamPool:
    """Stands in for torch.cuda.Stream(): a pool of 32 streams per device handed out round robin, as torch does."""

    class Stream:
        def __init__(self, handle):
            self.cuda_stream = handle

    def __init__(self, size=32):
        self.size, self.created = size, 0

    def __call__(self):
        self.created += 1
        return self.Stream(0x1000 + (self.created - 1) % self.size)


def test_capture_and_body_streams_differ_whenever_they_are_drawn():
    # what the engine did before: torch.cuda.graph's default capture stream is made once, the body stream later
    pool = _StreamPool()
    default_capture = pool()
    later = [pool() for _ in range(40)]
    assert any(s.cuda_stream == default_capture.cuda_stream for s in later)  # so a body stream could equal it
    for before in range(41):  # any number of streams made elsewhere first
        pool = _StreamPool()
        for _ in range(before):
            pool()
        streams = capture_streams(pool)
        assert streams.capture.cuda_stream != streams.body.cuda_stream, before


def test_capture_streams_draw_again_and_fail_clearly():
    handles = iter([7, 7, 7, 9])
    streams = capture_streams(lambda: _StreamPool.Stream(next(handles)))
    assert (streams.capture.cuda_stream, streams.body.cuda_stream) == (7, 9)
    with pytest.raises(RuntimeError, match="the stream pool has a single stream.*use mechanism='early_exit'"):
        capture_streams(_StreamPool(size=1))
