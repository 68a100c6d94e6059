"""``bench/serving_load.py`` end to end, as a short smoke: it starts ``serve`` on 127.0.0.1, replays a small bursty
trace against the four ways of serving, stops the server and writes its results; every request sent is answered or
refused, on the client's count and on the server's."""

from __future__ import annotations

import json
import re

import pytest

from adaptive_kernels import create_model
from adaptive_kernels.training import save_checkpoint

pytest.importorskip("aiohttp", reason="the load test's client needs aiohttp")
pytest.importorskip("matplotlib", reason="the load test plots its timeline with matplotlib")
pytest.importorskip("fastapi", reason="needs fastapi (the [serve] extra)")

from bench.serving_load import POLICIES, main

pytestmark = pytest.mark.slow


def test_load_script_smoke(tmp_path):
    spec = {"name": "resnet20_adn", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 2}}
    checkpoint = save_checkpoint({"model": create_model(spec["name"], **spec["kwargs"]).state_dict(),
                                  "model_spec": spec, "data": {"name": "synthetic", "image_size": [8, 8]}},
                                 tmp_path / "last.pt")
    accuracy = tmp_path / "subnets.json"
    accuracy.write_text(json.dumps({"FFF": 90.0, "TFT": 89.5, "TTT": 89.0}))
    out = tmp_path / "results"
    code = main(["--checkpoint", str(checkpoint), "--accuracy", str(accuracy), "--slo-ms", "50", "--rates", "30,60",
                 "--seconds", "1", "--max-batch", "4", "--profile-iters", "3", "--max-requests", "200",
                 "--scenario", "smoke", "--out", str(out)])
    assert code == 0  # nothing lost
    assert sorted(p.name for p in out.iterdir()) == ["smoke.json", "smoke.md", "smoke_timeline.png"]  # no temp files
    result = json.loads((out / "smoke.json").read_text())
    rows = result["rows"]
    assert [(r["rate"], r["policy"]) for r in rows] == [(rate, p) for rate in (30.0, 60.0) for p in POLICIES]
    for row in rows:
        assert row["sent"] > 0 and row["sent"] == row["served"] + row["refused"], row
        assert row["lost"] == row["other_errors"] == 0 and row["no_loss"]
        forced = row["forced"]
        assert forced is None or set(row["served_by_skip"]) <= {forced}  # a forced sub-network served them all
    assert "| 60 | adaptive |" in (out / "smoke.md").read_text()
    # the server stopped (SIGINT, graceful) and counted the same requests as the client
    stopped = re.search(r"stopped: (\d+) requests, (\d+) served \(\d+ within SLO\), (\d+) refused, (\d+) failed",
                        "\n".join(result["server_log_tail"]))
    assert stopped, result["server_log_tail"]
    submitted, served, refused, failed = map(int, stopped.groups())
    assert (submitted, served, refused, failed) == (sum(r["sent"] for r in rows), sum(r["served"] for r in rows),
                                                    sum(r["refused"] for r in rows), 0)
