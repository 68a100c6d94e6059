"""bench/plot.py on synthetic rows in a temp folder (never on committed results)."""

import itertools
import json

import pytest

from bench import plot

ENV = {
    "gpu": "Test GPU 80GB",
    "driver": "999.1",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "cuda": "13.0",
    "git_sha": "0123456789abcdef",
}


def row(provider, skip, median, macs, *, model="resnet50_adn", batch=1, mode="full", **extra):
    return {
        "provider": provider,
        "model": model,
        "skip": skip,
        "batch": batch,
        "dtype": "float16",
        "median_us": median,
        "p20_us": median and median * 0.9,
        "p80_us": median and median * 1.1,
        "macs": macs,
        **ENV,
        "mode": mode,
        "metric": "latency",
        **extra,
    }


def table_lines(md: str, title: str) -> list[list[str]]:
    """The cells of the markdown table under the line that starts with ``title``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    out = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


@pytest.fixture
def results(tmp_path):
    rows = [
        row("eager", "TTTT", 2000.0, 2.58e9),
        row("eager", "FFFF", 5000.0, 4.11e9),
        row("compile", "FFFF", 600.0, 4.11e9),
        row("compile_freeze", "FFFF", 480.0, 4.11e9),
        row("engine_conditional", "FFFF", 360.0, 4.11e9),
        row("engine_early_exit", "FFFF", 400.0, 4.11e9),
        row("compile", "TTTT", 420.0, 2.58e9),
        row("engine_conditional", "TTTT", 1234.5, 2.58e9),
        row("eager", "FFFF", 77.0, 4.11e9, batch=64),
        row("eager", "FFF", 5.0, 4e7, model="resnet20_adn", mode="smoke"),
    ]
    (tmp_path / "latency_resnet.json").write_text(json.dumps(rows))
    # other result files in bench/results/ (e.g. the training reproduction) are not rows: ignored
    (tmp_path / "fashion_mnist_reproduction.json").write_text(json.dumps([{"seed": 0, "adn_super": 91.0}]))
    return tmp_path


def test_latency_table_and_plot(results, tmp_path):
    out = tmp_path / "out"
    assert plot.main(["--results", str(results), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    # card and versions above the numbers
    assert "### Test GPU 80GB (driver 999.1), torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, git 0123456789ab" in md
    cells = table_lines(md, "**resnet50_adn**, batch 1")
    header = cells[0]
    assert header == [
        "sub-network",
        "GMACs",
        "eager",
        "compile",
        "compile_freeze",
        "engine_conditional",
        "engine_early_exit",
        "best engine / best compile",
    ]
    body = {c[0]: dict(zip(header, c, strict=True)) for c in cells[2:]}
    assert [c[0] for c in cells[2:]] == ["FFFF", "TTTT"]  # by falling MACs
    assert body["FFFF"]["GMACs"] == "4.110" and body["FFFF"]["eager"] == "5000"
    assert body["FFFF"]["best engine / best compile"] == f"{360 / 480:.2f}"
    assert body["TTTT"]["engine_conditional"] == "1234" and body["TTTT"]["compile_freeze"] == "—"
    assert body["TTTT"]["best engine / best compile"] == f"{1234.5 / 420:.2f}"
    assert table_lines(md, "**resnet50_adn**, batch 64")[2] == ["FFFF", "4.110", "77.0"]
    assert "resnet20_adn" not in md  # smoke rows left out by default
    png = (out / "latency_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_smoke_rows_on_request(results, tmp_path):
    assert plot.main(["--results", str(results), "--out", str(tmp_path / "o"), "--include-smoke"]) == 0
    md = (tmp_path / "o" / "results.md").read_text()
    assert table_lines(md, "**resnet20_adn**, batch 1")[2] == ["FFF", "0.040", "5.0"]


def test_switching_and_train_tables(tmp_path):
    common = {"model": "resnet50_adn", "batch": 1}
    made = [
        row(
            "compile",
            "FFFF",
            600.0,
            4.11e9,
            metric="make_available",
            setup_s=6.0,
            new_graphs=1,
            recompile_limit_hit=False,
        ),
        row(
            "compile",
            "TTTT",
            420.0,
            2.58e9,
            metric="make_available",
            setup_s=5.0,
            new_graphs=1,
            recompile_limit_hit=False,
        ),
        row(
            "compile",
            "TFFF",
            4000.0,
            3.9e9,
            metric="make_available",
            setup_s=0.1,
            new_graphs=0,
            recompile_limit_hit=True,
        ),
        row("compile", "FFFF<->TTTT", 700.0, None, metric="switch", switch_us=190.0),
        row("engine_conditional", "FFFF", 360.0, 4.11e9, metric="make_available", setup_s=3.0),
        row("engine_conditional", "TTTT", 250.0, 2.58e9, metric="make_available", setup_s=0.002),
        row("engine_conditional", "TFFF", 300.0, 3.9e9, metric="make_available", setup_s=0.004),
        row("engine_conditional", "FFFF", 4.0, None, metric="set_skip"),
        row("engine_conditional", "all", None, None, metric="memory", peak_alloc_bytes=3 * 2**20),
        row(
            "eager", "FFFF+TTTT", 150_000.0, 6.69e9, metric="train_step", step_mode="adn", images_per_s=426.7, batch=64
        ),
        row("eager", "FFFF", 100_000.0, 4.11e9, metric="train_step", step_mode="plain", images_per_s=640.0, batch=64),
    ]
    made += [
        row("cudnn+epilogue", "-", 21.7, 1.8e9, model="r50 l1 3x3 64-64", metric="layer_latency"),
        row("triton_fused", "-", 12.5, 1.8e9, model="r50 l1 3x3 64-64", metric="layer_latency"),
        row("cublas", "-", 9.0, 1e8, model="vit qkv 768-2304", metric="layer_latency"),
    ]
    for r in made:
        r.update({k: v for k, v in common.items() if r["metric"] not in ("train_step", "layer_latency")})
    (tmp_path / "rows.json").write_text(json.dumps(made))
    assert plot.main(["--results", str(tmp_path / "rows.json"), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    switching = {c[0]: c for c in table_lines(md, "**resnet50_adn**, batch 1 — making")[2:]}
    assert switching["compile"][1:7] == [
        "3",
        "6.000",
        f"{(5.0 + 0.1) / 2:.3f}",
        "no: from #3 on, 1 ran uncompiled",
        "190.0",
        "—",
    ]
    assert switching["engine_conditional"][1:] == ["3", "3.000", "0.003", "—", "—", "4.0", "3"]
    train = table_lines(md, "Training step")[2]
    assert train == ["resnet50_adn", "64", "float16", "150.0 (427/s)", "100.0 (640/s)", "—", "1.50"]
    layers = table_lines(md, "Single layers, batch 1")
    assert layers[0] == ["layer", "cublas", "cudnn+epilogue", "triton_fused"]
    assert layers[2:] == [["r50 l1 3x3 64-64", "—", "21.7", "12.5"], ["vit qkv 768-2304", "9.0", "—", "—"]]
    # the latency panel has no latency rows here: the markdown alone is written
    assert not (tmp_path / "latency_vs_macs.png").exists()


def test_bad_inputs(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        plot.load_rows([tmp_path])
    with pytest.raises(ValueError, match="does not exist"):
        plot.load_rows([tmp_path / "missing"])
    (tmp_path / "broken.json").unlink()
    assert plot.main(["--results", str(tmp_path)]) == 1  # no rows: says so, writes nothing
    assert not (tmp_path / "results.md").exists()


def test_autotuned_engine_rows_get_their_own_column():
    rows = [
        row("engine_conditional", "FFFF", 400.0, 4.11e9, autotune=False),
        row("engine_conditional", "FFFF", 300.0, 4.11e9, autotune=True),
        row("compile", "FFFF", 600.0, 4.11e9, autotune=True),  # not an engine: autotune does not apply
    ]
    cells = table_lines(plot.latency_tables(rows), "**resnet50_adn**, batch 1")
    header = ["sub-network", "GMACs", "compile", "engine_conditional", "engine_conditional+autotune"]
    assert cells[0] == [*header, "best engine / best compile"]
    assert cells[2] == ["FFFF", "4.110", "600.0", "400.0", "300.0", "0.50"]


def test_labels_of_points_at_equal_macs_do_not_overlap():
    """ResNet-20's three stages cost the same MACs: TFF, FTF and FFT share an x (as do TTF, TFT and FTT), at nearly
    equal latencies; every point is labelled with its sub-network and no label lies on another."""
    matplotlib = pytest.importorskip("matplotlib", reason="pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skips = ["".join(c) for c in itertools.product("FT", repeat=3)]
    rows = [row(provider, skip, base * (100 - 20 * skip.count("T") + i), 4e7 - 1e7 * skip.count("T"),
                model="resnet20_adn")
            for provider, base in (("eager", 1.0), ("compile", 0.5), ("engine_conditional", 0.3))
            for i, skip in enumerate(skips)]
    fig = plot.latency_figure(rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        labels = [t for t in ax.texts if t.get_text() in skips]
        assert sorted(t.get_text() for t in labels) == sorted(skips * 3)  # every point labelled
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
    finally:
        plt.close(fig)
