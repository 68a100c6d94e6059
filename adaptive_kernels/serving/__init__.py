"""SLO-aware serving of an ADN: per dispatch, the batch and the sub-network that meet the oldest request's deadline.

``policy`` (the pure decision rule), ``latency`` (per-bucket profile, corrected online), ``scheduler`` (queue,
dispatcher thread, refusals, no-loss accounting), ``plan`` (checkpoint -> engine, profile, accuracies), ``http``
(the Open Inference Protocol server with Prometheus metrics, ``[serve]`` extra) and ``ray`` (a Ray Serve
deployment, one replica per engine). See docs/serving.md.
"""

from .latency import LatencyModel, batch_buckets
from .plan import ServingPlan, build_plan, checkpoint_model, load_accuracy
from .policy import Decision, Queued, plan_dispatch, rank_by_accuracy
from .scheduler import Counters, Outcome, Refused, Scheduler, Served

__all__ = [
    "Counters",
    "Decision",
    "LatencyModel",
    "Outcome",
    "Queued",
    "Refused",
    "Scheduler",
    "Served",
    "ServingPlan",
    "batch_buckets",
    "build_plan",
    "checkpoint_model",
    "load_accuracy",
    "plan_dispatch",
    "rank_by_accuracy",
]
