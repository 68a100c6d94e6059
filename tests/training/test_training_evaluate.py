"""``training/evaluate.py``'s trade-off plot: every label readable (none on another label or on a marker, even
where sub-networks have equal MACs), the key to the T/F letters and the test-set size on the figure."""

import itertools

import pytest

from adaptive_kernels.training.evaluate import SKIP_KEY, SubnetResult, plot_tradeoff, tradeoff_figure

matplotlib = pytest.importorskip("matplotlib", reason="pip install matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _results(shift: float) -> list[SubnetResult]:
    # ResNet-20's stages cost the same MACs: the three one-stage skips share an x, at nearly equal accuracies
    macs = {0: 40e6, 1: 30e6, 2: 20e6, 3: 10e6}
    out = []
    for i, skip in enumerate("".join(c) for c in itertools.product("FT", repeat=3)):
        t = skip.count("T")
        out.append(SubnetResult(skip, 90.0 - 2 * t + 0.05 * i + shift, int(macs[t]), 1000.0 - 100 * t + i))
    return out


def test_labels_cover_no_other_label_and_no_marker():
    fig = tradeoff_figure({"calibrated": _results(0.0), "as trained": _results(-0.3)}, "t", 64, test_images=500)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    radius = 3.0 * fig.dpi / 72  # a marker's radius
    try:
        for ax in fig.axes:
            labels = [t for t in ax.texts if t.get_text() in {r.skip for r in _results(0)}]
            assert len(labels) == 16  # every point of both series labelled
            boxes = [t.get_window_extent(renderer) for t in labels]
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), (a, b)
            markers = [ax.transData.transform(p) for c in ax.collections for p in c.get_offsets()]
            for box in boxes:
                assert not any(box.x0 - radius < x < box.x1 + radius and box.y0 - radius < y < box.y1 + radius
                               for x, y in markers), box
        assert SKIP_KEY in [t.get_text() for t in fig.texts]
        assert all(ax.get_ylabel() == "test accuracy, % (500 test images)" for ax in fig.axes)
    finally:
        plt.close(fig)


def test_the_key_says_what_t_means():
    assert "T = that stage's skippable blocks skipped" in SKIP_KEY and "the first stage first" in SKIP_KEY


def test_plot_tradeoff_writes_a_png(tmp_path):
    path = plot_tradeoff({"a": _results(0.0)}, tmp_path / "t.png", test_images=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
