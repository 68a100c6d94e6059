"""The serving path on a GPU (``-m gpu``; skipped without CUDA, tests/conftest.py): a plan built on the CUDA engine
profiles one capture per batch bucket, each serving every sub-network; the scheduler, fed from threads with requests
of 1 and 3 images (some forcing a sub-network), pads each batch to its bucket without capturing again and answers
each request within the fp16 rule (helpers.check_fp16_error) of the model on that request's own input. Its host side
(conversion, padding, answers from their own rows) is also tested on the CPU (test_serving_scheduler.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import check_fp16_error, randomize, torch_fp16

from adaptive_kernels import create_model
from adaptive_kernels.models.skip import skip_to_str
from adaptive_kernels.serving import Scheduler, batch_buckets, build_plan
from adaptive_kernels.serving.scheduler import PADDED_MECHANISMS

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_references")]  # tests/conftest.py


def test_scheduler_on_the_gpu_engine_serves_padded_buckets_from_one_capture_each_within_the_fp16_rule():
    torch.manual_seed(3)
    model = randomize(create_model("resnet20_adn").cuda(), calibrate=(8, 3, 32, 32))
    skips = model.skip_configs()
    accuracy = {s: 90.0 - sum(s) for s in skips}
    plan = build_plan(model, "r20", (3, 32, 32), max_batch=4, accuracy=accuracy, device="cuda", profile_iters=3)
    engine = plan.engine
    assert engine.mechanism in PADDED_MECHANISMS and plan.latency.padded
    assert engine.capture_count == len(batch_buckets(4))  # profiled at 1, 2, 4: one capture each, all sub-networks
    scheduler = Scheduler(engine, plan.example_input, plan.latency, plan.accuracy)
    sent = []  # (input, forced sub-network, future), appended as one item: 4 threads append at once

    def client(seed: int):
        g = torch.Generator().manual_seed(seed)
        for i in range(20):
            x = torch.randn(3 if i % 4 == 1 else 1, 3, 32, 32, generator=g)  # 3 images: padded to the bucket of 4
            skip = skips[(seed + i) % len(skips)] if i % 5 == 2 else None
            sent.append((x, skip, scheduler.submit(x, 5.0, skip=skip)))

    with ThreadPoolExecutor(4) as clients:  # 4 clients at once; a client's error is raised here
        list(clients.map(client, range(4)))
    scheduler.close()
    stats = scheduler.stats()
    assert stats.served == len(sent) == 80 and stats.refused == stats.failed == 0
    assert engine.capture_count == len(batch_buckets(4))  # every batch ran in its bucket's capture
    half = torch_fp16(model)
    with torch.no_grad():
        for x, skip, future in sent:
            served = future.result()
            if skip is not None:
                assert served.skip == skip_to_str(skip)
            assert served.output.shape == (len(x), 10) and served.output.device.type == "cpu"
            x = x.cuda()
            want = model(x, served.skip).float().cpu()
            check_fp16_error(served.output, want, half(x.half(), served.skip).float().cpu(), (served.skip, len(x)))
