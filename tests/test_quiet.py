"""``adaptive_kernels._quiet.muted``: what a muted thread prints is dropped, every other thread's output goes
through, and the process's streams are put back when the last muted thread leaves, however the threads overlap
(``contextlib.redirect_stdout``, used before, left ``sys.stdout`` a ``StringIO`` for good after two overlapping
``compile`` calls)."""

from __future__ import annotations

import contextlib
import io
import sys
import threading

from adaptive_kernels._quiet import muted


@contextlib.contextmanager
def streams():
    """The process's stdout and stderr as StringIOs within (set in the test itself: pytest's capture swaps them
    between a fixture's set-up and the test)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err = io.StringIO(), io.StringIO()
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved


def test_a_muted_thread_is_silent_and_the_others_are_heard_while_the_blocks_overlap():
    with streams() as (out, err):
        heard = overlapping_threads()
        assert sys.stdout is out and sys.stderr is err  # put back
    assert heard and out.getvalue() == "main while muted\nb after\n"
    assert err.getvalue() == "b to stderr\n"


def overlapping_threads() -> bool:
    """Thread a muted (stdout and stderr) enters first and leaves first, thread b (stdout only) in between; the main
    thread prints meanwhile. What redirect_stdout got wrong."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():  # enters first, leaves first: what redirect_stdout got wrong
        with muted(stdout=True, stderr=True):
            a_in.set()
            b_in.wait(5)
            print("a muted")
            print("a muted", file=sys.stderr)
        a_out.set()

    def b():
        a_in.wait(5)
        with muted():
            b_in.set()
            a_out.wait(5)
            print("b muted")
            print("b to stderr", file=sys.stderr)  # only stdout muted for b
            sys.stdout.flush()
        print("b after")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    a_in.wait(5)
    print("main while muted", flush=True)
    for t in threads:
        t.join(10)
    return not any(t.is_alive() for t in threads)


def test_nested_blocks_of_one_thread_unmute_only_at_the_outer_end():
    with streams() as (out, _):
        with muted():
            with muted():
                print("inner")
            print("still muted")
            assert sys.stdout is not out and sys.stdout.isatty() == out.isatty()  # the filter forwards the rest
        print("heard")
        assert sys.stdout is out
    assert out.getvalue() == "heard\n"


def test_a_stream_replaced_inside_the_block_is_left_to_whoever_replaced_it():
    theirs = io.StringIO()
    with streams():
        with muted():
            sys.stdout = theirs
        assert sys.stdout is theirs
