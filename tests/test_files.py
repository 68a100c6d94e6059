"""``adaptive_kernels._files``: a write that fails or is killed never leaves a partial file at the target, nor
destroys the previous one; what a kill leaves beside it is removed by the next run's output check."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptive_kernels._files import atomic_path, check_output_file, write_text


def test_an_error_while_writing_keeps_the_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    assert write_text(target, "new").read_text() == "new" and os.listdir(tmp_path) == ["r.json"]


def test_a_full_disk_keeps_the_previous_file(tmp_path):
    """A real short write: the file size limit (RLIMIT_FSIZE) makes write() fail with EFBIG like a full disk."""
    target = tmp_path / "r.json"
    target.write_text("old")
    script = textwrap.dedent(f"""
        import resource, signal
        from adaptive_kernels._files import write_text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        write_text({str(target)!r}, "x" * 10_000)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_a_kill_before_the_rename_leaves_a_temp_that_the_next_check_removes(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    script = textwrap.dedent(f"""
        import os
        from adaptive_kernels._files import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_text("new")
            os._exit(9)  # a kill -9 just before the rename
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert target.read_text() == "old" and len(os.listdir(tmp_path)) == 2
    other = tmp_path / ".other.onnx.abc.tmp"  # another file's temp: left alone
    other.write_text("")
    check_output_file(target, "--out")
    assert sorted(os.listdir(tmp_path)) == [".other.onnx.abc.tmp", "model.onnx"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


ROOT = Path(__file__).resolve().parents[1]


def _in_place_writes(path: Path) -> list[str]:
    """Calls in ``path`` that write a file in place: ``.write_text``/``.write_bytes``/``savefig``/``open(.., "w")``
    on anything but the temporary path ``atomic_path`` hands out (named ``tmp``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        target = None
        if isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes"):
            target = func.value
        elif isinstance(func, ast.Attribute) and func.attr == "savefig" and node.args:
            target = node.args[0]
        elif isinstance(func, ast.Name) and func.id == "open" and len(node.args) > 1:
            mode = node.args[1]
            # appending ("a": the training log) keeps what is there; a torn last line is dropped on resume
            if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wx"):
                target = node.args[0]
        if target is not None and not (isinstance(target, ast.Name) and target.id == "tmp"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_file_the_package_and_bench_write_is_written_atomically():
    files = [p for p in sorted((ROOT / "adaptive_kernels").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
             if p.name != "_files.py"]
    found = [hit for p in files for hit in _in_place_writes(p)]
    assert not found, "write through adaptive_kernels._files (atomic_path / write_text):\n" + "\n".join(found)
