"""Simulated-clock replay of the load test's traces: the real dispatch policy, latencies from a measured profile.

Each request of a ``bench/serving_load.py`` trace (same generator, same seeds) arrives on a virtual clock; the
dispatcher does what the scheduler does, with no threads and no engine: the policy (``plan_dispatch``, with the
scheduler's ``ArrivalRate`` and ``LatencyModel``) decides, a served batch takes the profiled latency times
``--load`` times a mean-one log-normal factor of sigma ``--noise`` (drawn per call), the latency model observes
it, and the clock moves on. What it leaves out: HTTP, the client, the GIL, the machine's other jobs; so it shows
the policy, not the server (its attainment is at or above a real sweep's). A sweep of 9 rates x 7 ways of serving
x 20 traces takes seconds, which is what tuning a policy needs.

Ways of serving, as in the load test: ``super``, ``base``, ``static`` (forced sub-networks) and ``adaptive`` (its
reserve's share following the attainment, ``ReserveShare``, as the scheduler's does); and ``cautious``: the adaptive
policy with the share fixed at ``RESERVE_SHARE`` (as before it followed the attainment); ``myopic``: without its
reserve and burst guard (steps 4 and 5 of ``policy.py``: no arrival rate, no SLO); ``unguarded``: without the burst
guard (step 5). All keep step 3 as it is (split, lookahead). The share, like a server's, lives on from one trace of
a rate to the next and starts afresh at each rate of a sweep; a replay, like the HTTP run's one server, keeps it
from round to round and from rate to rate.

    python bench/serving_sim.py --profile bench/results/serving/paper_resnet50.json --scenario sim_paper_resnet50 \\
        --rates 5,10,15,20,25,30,35,40,45 --out bench/results/serving
    python bench/serving_sim.py --profile ... --load 1.5 --noise 0.3 --scenario sim_paper_resnet50_loaded ...

``--replay RESULT``: how far to trust it. The HTTP load test's own traces (its rounds, seeds and bound, rebuilt as
``serving_load`` made them) are simulated with the profile that run measured, each ``--repeats`` times (noise
draws), beside what the server did on them:

    python bench/serving_sim.py --replay bench/results/serving/paper_resnet50_split.json --noise 0.3 --load 1.2 \
        --scenario replay_paper_resnet50_split --out bench/results/serving
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/serving_sim.py` from anywhere
from adaptive_kernels._files import write_text
from adaptive_kernels.cli.checks import (
    ArgumentParser,
    check_output_dir,
    non_negative_float,
    path_text,
    positive_float,
    positive_int,
    seed_int,
)
from adaptive_kernels.models.skip import parse_skip, skip_to_str
from adaptive_kernels.serving.latency import ArrivalRate, LatencyModel, ReserveShare
from adaptive_kernels.serving.policy import (
    RESERVE_SHARE,
    Costs,
    Queued,
    parse_accuracy,
    plan_dispatch,
    rank_by_accuracy,
)
from bench.serving_load import (
    POLICIES,
    bursty_trace,
    depth_fraction,
    file_name,
    fmt,
    machine,
    rate_list,
    static_pick,
    summarize,
)

SIM_POLICIES = (*POLICIES, "cautious", "myopic", "unguarded")
#: the ways whose reserve share follows the attainment (the others: forced, fixed at RESERVE_SHARE, or no reserve)
FOLLOWING = ("adaptive", "unguarded")
#: what a sweep (--profile) and a replay (--replay) read of a serving_load.py result, with its JSON type
SWEEP_NEEDS = {"latency_us": dict, "accuracy": dict, "slo_ms": float, "max_batch": int, "model": str,
               "accuracy_source": str, "machine": dict}
REPLAY_NEEDS = {"latency_us": dict, "accuracy": dict, "slo_ms": float, "max_batch": int, "machine": dict,
                "seconds": float, "rounds": int, "cv2": float, "depth": float, "forced": dict, "rows": list}
#: the most requests one simulated trace may be expected to hold (rate x seconds): its arrays and its minutes
MAX_TRACE_REQUESTS = 1_000_000
MACHINE_NEEDS = ("cpu", "cores", "torch", "onnxruntime", "git", "date")


def simulate(arrivals: np.ndarray, slo_s: float, latency_us: dict, accuracy: dict[str, float], max_batch: int,
             forced: str | None = None, *, reserve: bool = True, guard: bool = True,
             share: ReserveShare | None = None, load: float = 1.0, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """One record per arrival, as ``serving_load.replay`` writes them (status, latency s, skip, batch, met).

    latency_us: ``{bucket: {"FFF": µs}}`` (a profile; the JSON's string keys do); accuracy: the servable
    sub-networks; forced: the sub-network every request forces (None: the policy picks); reserve: False passes the
    policy no arrival rate (no reserve); guard: False gives the requests no SLO (no burst guard); share: the
    reserve's share, told each outcome of a request the policy chose for, as the scheduler does (None: fixed at
    ``RESERVE_SHARE``); load, noise: a call takes profiled x load x LogNormal(-noise²/2, noise).
    """
    latency = LatencyModel({int(b): t for b, t in latency_us.items()})
    stages = latency.num_stages
    acc = {parse_skip(s, stages): a for s, a in accuracy.items()}
    costs = Costs.build(latency.profiled, rank_by_accuracy(acc, latency.predict), max_batch)
    skip = None if forced is None else parse_skip(forced, stages)
    rate, rng = ArrivalRate(), random.Random(seed)
    records: list[dict] = [{} for _ in arrivals]
    queue: list[Queued] = []
    ids: list[int] = []  # the arrival index of each queued request
    clock, nxt = 0.0, 0
    while nxt < len(arrivals) or queue:
        while nxt < len(arrivals) and arrivals[nxt] <= clock:
            queue.append(Queued(arrivals[nxt] + slo_s, 1, skip, slo_s if guard else 0.0))
            ids.append(nxt)
            rate.arrived(arrivals[nxt])
            nxt += 1
        if not queue:
            clock = float(arrivals[nxt])
            continue
        decision = plan_dispatch(queue, clock, costs, latency.factor, fifo=True,
                                 rate=rate.at(clock) if reserve else 0.0,
                                 share=RESERVE_SHARE if share is None else share.share)
        for i in decision.refuse:
            records[ids[i]].update(status="refused", latency=clock - arrivals[ids[i]])
            if share is not None and skip is None:
                share.outcome(False)
        if decision.serve:
            took = latency.profiled(decision.skip, decision.batch) * load
            if noise:
                took *= math.exp(rng.gauss(-noise * noise / 2, noise))
            latency.observe(decision.skip, decision.batch, took)
            clock += took
            name = skip_to_str(decision.skip)
            for i in decision.serve:
                met = clock <= queue[i].deadline
                records[ids[i]].update(status="served", latency=clock - arrivals[ids[i]], skip=name,
                                       batch=decision.batch, met=met)
                if share is not None and skip is None:
                    share.outcome(met)
        elif decision.refuse:
            latency.relax()
        taken = len(decision.refuse) + len(decision.serve)  # a fifo queue: the oldest ones
        del queue[:taken], ids[:taken]
    return records


def sweep(profile: dict, rates: list[float], seconds: float, traces: int, cv2: float, depth: float, load: float,
          noise: float, seed: int) -> list[dict]:
    """Per rate and way of serving: each trace's summary, then their mean and standard error."""
    accuracy, latency_us, slo_ms = profile["accuracy"], profile["latency_us"], profile["slo_ms"]
    max_batch = profile["max_batch"]
    forced = {"super": max(accuracy, key=accuracy.get), "base": next(s for s in accuracy if set(s) == {"T"}),
              "static": static_pick(latency_us, accuracy, slo_ms), "adaptive": None, "cautious": None,
              "myopic": None, "unguarded": None}
    rows = []
    for rate in rates:
        runs: dict[str, list[dict]] = {p: [] for p in SIM_POLICIES}
        shares = {p: ReserveShare() for p in FOLLOWING}  # a server's: it lives on from trace to trace
        for k in range(traces):
            arrivals = bursty_trace(seconds, rate, cv2, seed + k, depth=depth)
            for policy in SIM_POLICIES:
                records = simulate(arrivals, slo_ms / 1e3, latency_us, accuracy, max_batch, forced[policy],
                                   reserve=policy != "myopic", guard=policy not in ("myopic", "unguarded"),
                                   share=shares.get(policy), load=load, noise=noise, seed=seed + k)
                runs[policy].append(summarize(records, accuracy, slo_ms, seconds))
        base = np.array([r["slo_attainment"] for r in runs["base"]])
        for policy in SIM_POLICIES:
            got = runs[policy]
            attainment = np.array([r["slo_attainment"] for r in got])
            served = sum(r["served"] for r in got)
            rows.append({
                "rate": rate, "policy": policy, "forced": forced[policy], "traces": traces,
                "sent": sum(r["sent"] for r in got), "served": served, "refused": sum(r["refused"] for r in got),
                "slo_attainment": float(attainment.mean()), "slo_attainment_se": _se(attainment),
                "vs_base": float((attainment - base).mean()), "vs_base_se": _se(attainment - base),
                "mean_accuracy": (sum(r["mean_accuracy"] * r["served"] for r in got if r["served"]) / served
                                  if served else None),
                "p99_ms": _mean_of_present([r["p99_ms"] for r in got]),
                "mean_batch": _mean_of_present([r["mean_batch"] for r in got]),
            })
    return rows


def replay(result: dict, seed: int, load: float, noise: float, repeats: int) -> list[dict]:
    """Per (rate, way of serving) of a ``serving_load.py`` result: its traces simulated (``repeats`` noise draws
    each) beside the HTTP run's attainment and accuracy; ``seed``: the load test's ``--seed``."""
    accuracy, latency_us, slo_ms = result["accuracy"], result["latency_us"], result["slo_ms"]
    length = result["seconds"] / result["rounds"]
    rows = []
    # the server's share lives on from round to round and from rate to rate (one server, rates in the run's order)
    shares = [ReserveShare() for _ in range(repeats)]
    for http in result["rows"]:
        rate, policy = http["rate"], http["policy"]
        traces = [bursty_trace(length, rate, result["cv2"], seed + r, depth=result["depth"],
                               limit=result.get("max_requests")) for r in range(result["rounds"])]
        forced = result["forced"][policy]
        runs = []
        for k in range(repeats):
            share = shares[k] if forced is None else None
            records = [record for r, arrivals in enumerate(traces)
                       for record in simulate(arrivals, slo_ms / 1e3, latency_us, accuracy, result["max_batch"],
                                              forced, share=share, load=load, noise=noise, seed=1000 * k + r)]
            runs.append(summarize(records, accuracy, slo_ms, result["seconds"]))
        attainment = np.array([run["slo_attainment"] for run in runs])
        served = sum(run["served"] for run in runs)
        rows.append({"rate": rate, "policy": policy, "sent": runs[0]["sent"], "http_sent": http["sent"],
                     "slo_attainment": float(attainment.mean()), "slo_attainment_min": float(attainment.min()),
                     "slo_attainment_max": float(attainment.max()), "http_slo_attainment": http["slo_attainment"],
                     "mean_accuracy": (sum(run["mean_accuracy"] * run["served"] for run in runs if run["served"])
                                       / served if served else None),
                     "http_mean_accuracy": http["mean_accuracy"]})
    return rows


def replay_markdown(result: dict) -> str:
    """One row per (rate, way of serving): the HTTP run beside its simulation."""
    m = result["machine"]
    lines = [f"# Simulated replay of an HTTP load test: {result['scenario']}", "",
             (f"SIMULATED (bench/serving_sim.py --replay): the traces of {result['replayed']} (seed {result['seed']}, "
              f"{result['rounds']} rounds of {result['seconds'] / result['rounds']:g} s per rate), each simulated "
              f"{result['repeats']} times with the profile that run measured, calls x {result['load']:g} x a "
              f"mean-one log-normal factor (sigma {result['noise']:g}); beside them what the server did "
              f"({result['http_machine']})."),
             (f"Simulated on: {m['cpu']}, python {m['python']}, numpy {m['numpy']}, git {m['git']}, {m['date']}."), "",
             ("| rate (req/s) | serving | sent (HTTP) | HTTP attainment | simulated (min-max) | HTTP accuracy "
              "| simulated accuracy |"), "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = "-" if r["mean_accuracy"] is None else f"{r['mean_accuracy']:.2f}"
        http_acc = "-" if r["http_mean_accuracy"] is None else f"{r['http_mean_accuracy']:.2f}"
        lines.append(f"| {r['rate']:g} | {r['policy']} | {r['sent']} ({r['http_sent']}) | "
                     f"{r['http_slo_attainment']:.3f} | {r['slo_attainment']:.3f} ({r['slo_attainment_min']:.3f}-"
                     f"{r['slo_attainment_max']:.3f}) | {http_acc} | {acc} |")
    return "\n".join(lines) + "\n"


def _share_settings() -> str:
    share = ReserveShare()
    return (f"ReserveShare {share.low:g}..{share.high:g}, budget {share.budget:g} of the latest "
            f"{share.window} outcomes")


def _mean_of_present(values: list[float | None]) -> float | None:
    """The mean of the values that are there (a trace with nothing served has no p99 or batch), None if none is."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def goals(rows: list[dict], accuracy: dict[str, float]) -> list[dict]:
    """Per rate, the issue's goal read on the simulated means: where the base-net attains >= 0.99, does the adaptive
    server too, and is its accuracy at least halfway from the base-net's to the super-net's?"""
    base_acc = next(a for s, a in accuracy.items() if set(s) == {"T"})
    halfway = (base_acc + max(accuracy.values())) / 2
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        row = {r["policy"]: r for r in rows if r["rate"] == rate}
        a, b = row["adaptive"], row["base"]
        out.append({"rate": rate, "base_attains_99": b["slo_attainment"] >= 0.99,
                    "adaptive_attains_99": a["slo_attainment"] >= 0.99,
                    "within_2se_of_base": a["vs_base"] >= -2 * a["vs_base_se"],
                    "accuracy_halfway": a["mean_accuracy"] is not None and a["mean_accuracy"] >= halfway,
                    "halfway": halfway})
    return out


def markdown(result: dict) -> str:
    """One row per (rate, way of serving): attainment (± SE over traces), difference to the base-net, accuracy; then
    the goal per rate."""
    title = f"# Simulated serving sweep: {result['scenario']}"
    m = result["machine"]
    lines = [title, "",
             (f"SIMULATED (bench/serving_sim.py): no server, no engine. The real policy (`plan_dispatch`, the "
              f"reserve's share following the attainment: {result['reserve_share']}) and latency model on a "
              f"virtual clock; each call takes the profiled latency x {result['load']:g} x a mean-one log-normal "
              f"factor (sigma {result['noise']:g}). Profile: {result['profile']} (measured by the HTTP sweep: "
              f"{result['profile_machine']}). Model {result['model']}, SLO {result['slo_ms']:g} ms, max batch "
              f"{result['max_batch']}; accuracy: {result['accuracy_source']}; static pick {result['static_pick']}. "
              f"{result['traces']} traces of {result['seconds']:g} s per rate (bench/serving_load.py's generator, "
              f"seeds {result['seed']}..{result['seed'] + result['traces'] - 1}; Gamma CV² {result['cv2']:g}, "
              f"rate x (1 +/- {result['depth']:g}) sine); every way of serving replays the same traces. "
              f"`cautious` = the adaptive policy with the share fixed at {RESERVE_SHARE:g} (before it followed the "
              f"attainment), `myopic` = without the reserve and the burst guard (steps 4 and 5), `unguarded` = "
              f"without the burst guard (step 5); all keep step 3 (split, lookahead). The share lives on from one "
              f"trace of a rate to the next, as a server's would."),
             (f"Simulated on: {m['cpu']}, python {m['python']}, numpy {m['numpy']}, git {m['git']}, {m['date']}; "
              f"the sweep took {result['wall_s']:.1f} s."), "",
             ("| rate (req/s) | serving | sent | refused | SLO attainment ± SE | - base ± SE | mean accuracy | p99 ms "
              "| mean batch |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['rate']:g} | {r['policy']} | {r['sent']} | {r['refused']} | {r['slo_attainment']:.4f} ± "
                     f"{r['slo_attainment_se']:.4f} | {r['vs_base']:+.4f} ± {r['vs_base_se']:.4f} | "
                     f"{fmt(r['mean_accuracy'], '.2f')} | {fmt(r['p99_ms'], '.1f')} | {fmt(r['mean_batch'], '.2f')} |")
    lines += ["", f"Goal (halfway accuracy {result['goals'][0]['halfway']:.2f}):", "",
              "| rate | base ≥ 0.99 | adaptive ≥ 0.99 | adaptive ≥ base - 2 SE | accuracy ≥ halfway |",
              "|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for g in result["goals"]:
        lines.append(f"| {g['rate']:g} | {yes[g['base_attains_99']]} | {yes[g['adaptive_attains_99']]} | "
                     f"{yes[g['within_2se_of_base']]} | {yes[g['accuracy_halfway']]} |")
    return "\n".join(lines) + "\n"


def read_result(path: str, flag: str, needs: dict[str, type]) -> dict:
    """The serving_load.py result at ``path`` (given as ``flag``); a one-line ValueError when it is not one: no such
    file, not JSON, or without one of ``needs`` (the machine's fields, a base-net's accuracy)."""
    fix = "give the JSON bench/serving_load.py wrote (e.g. bench/results/serving/paper_resnet50.json)"
    try:
        result = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e}); {fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{flag} {path} is not JSON ({e}); {fix}") from None
    if not isinstance(result, dict):
        result = {}  # a JSON list or number: it lacks every key below
    if result.get("simulated"):
        raise ValueError(f"{flag} {path} is a serving_sim.py result; {fix}")
    number = (int, float)  # JSON writes 200.0 as a float and 200 as an int
    wrong = [key for key, kind in needs.items() if not isinstance(result.get(key), number if kind is float else kind)
             or isinstance(result[key], bool)]
    wrong += [f"machine.{key}" for key in MACHINE_NEEDS if "machine" not in wrong and key not in result["machine"]]
    if wrong:
        raise ValueError(f"{flag} {path} is not a serving_load.py result (it lacks {', '.join(wrong)}, or has the "
                         f"wrong type); {fix}")
    if not any(set(skip) == {"T"} for skip in result["accuracy"]):
        raise ValueError(f"{flag} {path}: its accuracy lists no base-net (all T), which the base column serves; {fix}")
    problem = _wrong_value(result, needs)
    if problem:
        raise ValueError(f"{flag} {path}: {problem}; {fix}")
    return result


def _finite(value: object) -> bool:
    """A JSON number (not a boolean), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object, least: int) -> bool:
    """A JSON integer (not a boolean) >= ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _wrong_value(result: dict, needs: dict[str, type]) -> str | None:
    """What is wrong with the values of a result whose ``needs`` have the right types (read_result): the field and
    the problem, or None. What the simulation would otherwise fail on minutes in (or not at all: an SLO of 0 ms
    refuses everything and writes a meaningless result)."""
    profile = result["latency_us"]
    bad = next((b for b in profile if not b.isdigit() or int(b) < 1), None)
    if bad is not None:
        return f"latency_us has the key {bad!r}: its keys are the profiled batch sizes, positive integers"
    bad = next((b for b, table in profile.items() if not isinstance(table, dict) or not table), None)
    if bad is not None:
        return f"latency_us[{bad!r}] is {profile[bad]!r}: each batch size maps sub-networks to µs"
    try:
        latency = LatencyModel({int(b): t for b, t in profile.items()})  # batch 1, one set of sub-networks, µs > 0
    except ValueError as e:
        return f"latency_us: {e}"
    accuracy = result["accuracy"]
    try:  # the scheduler's own reading: finite numbers, one per sub-network of the profile's stages
        table = parse_accuracy(accuracy, latency.num_stages)
    except ValueError as e:
        return f"accuracy: {e}"
    unprofiled = [skip_to_str(s) for s in table if s not in latency.skips]
    if unprofiled:
        return (f"accuracy lists {', '.join(unprofiled)}, which latency_us does not profile: each served "
                f"sub-network needs both")
    if not _finite(result["slo_ms"]) or result["slo_ms"] <= 0:
        return f"slo_ms is {json.dumps(result['slo_ms'])}: the SLO is a finite number of ms > 0"
    if not _count(result["max_batch"], 1) or result["max_batch"] > latency.max_batch:
        return (f"max_batch is {result['max_batch']}, but latency_us profiles batches 1..{latency.max_batch}: "
                f"max_batch is within that range")
    if "rows" not in needs:
        return None
    for key, least in (("seconds", 0.0), ("cv2", 0.0)):
        if not _finite(result[key]) or result[key] <= least:
            return f"{key} is {json.dumps(result[key])}: a finite number > {least:g}"
    if not 0 <= result["depth"] < 1:
        return f"depth is {json.dumps(result['depth'])}: the rate's sine amplitude is in [0, 1)"
    if not _count(result["rounds"], 1):
        return f"rounds is {result['rounds']}: at least 1"
    for key, least in (("max_requests", 1), ("seed", 0)):
        if result.get(key) is not None and not _count(result[key], least):
            return f"{key} is {json.dumps(result[key])}: an integer >= {least} (or absent)"
    forced = result["forced"]
    for skip_key, skip in forced.items():
        if skip is not None and skip not in accuracy:
            return f"forced[{skip_key!r}] is {json.dumps(skip)}: a sub-network of accuracy, or null (the policy picks)"
    if not result["rows"]:
        return "rows is empty: the load test's rows are the runs to replay"
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, dict):
            return f"rows[{i}] is {json.dumps(row)}: each row is an object"
        if not isinstance(row.get("policy"), str) or row["policy"] not in forced:
            return f"rows[{i}].policy is {json.dumps(row.get('policy'))}: one of forced's ({', '.join(forced)})"
        rate = row.get("rate")
        if not _finite(rate) or rate <= 0:
            return f"rows[{i}].rate is {json.dumps(rate)}: a request rate per second, finite and > 0"
        expected = rate * result["seconds"] / result["rounds"]  # bursty_trace draws at most max_requests
        if min(expected, result.get("max_requests") or math.inf) > MAX_TRACE_REQUESTS:
            return (f"rows[{i}]: rate {rate:g} x {result['seconds'] / result['rounds']:g} s makes traces of "
                    f"~{expected:,.0f} requests; at most {MAX_TRACE_REQUESTS:,}")
        if not _finite(row.get("slo_attainment")):
            return f"rows[{i}].slo_attainment is {json.dumps(row.get('slo_attainment'))}: a finite number"
        if row.get("mean_accuracy") is not None and not _finite(row["mean_accuracy"]):
            return f"rows[{i}].mean_accuracy is {json.dumps(row['mean_accuracy'])}: a finite number or null"
        if not _count(row.get("sent"), 0):
            return f"rows[{i}].sent is {json.dumps(row.get('sent'))}: a count of requests"
    return None


def main(argv: list[str] | None = None) -> int:
    import time

    p = ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=path_text,
                   help="a serving_load.py result (its latency_us, accuracy, slo_ms, max_batch are used)")
    p.add_argument("--replay", type=path_text, help="a serving_load.py result whose own traces to simulate (no sweep)")
    p.add_argument("--repeats", type=positive_int, default=5, help="--replay: simulations (noise draws) per trace")
    p.add_argument("--scenario", type=file_name, required=True, help="name of the result files")
    p.add_argument("--rates", type=rate_list, help="mean request rates per second, comma-separated")
    p.add_argument("--seconds", type=positive_float, default=30.0, help="length of one trace")
    p.add_argument("--traces", type=positive_int, default=20, help="traces per rate (seeds seed, seed + 1, ...)")
    p.add_argument("--cv2", type=positive_float, default=4.0, help="squared coefficient of variation of inter-arrivals")
    p.add_argument("--depth", type=depth_fraction, default=0.5, help="relative amplitude of the rate's sine")
    p.add_argument("--load", type=positive_float, default=1.0, help="calls take the profile times this")
    p.add_argument("--noise", type=non_negative_float, default=0.0, help="sigma of the per-call log-normal factor")
    p.add_argument("--seed", type=seed_int,
                   help="first trace's seed (default 0; --replay: the load test's, as recorded)")
    p.add_argument("--out", type=path_text, required=True)
    args = p.parse_args(argv)
    args.out = Path(args.out)
    # a flag of the other mode would be ignored without a word
    if args.replay is None and args.repeats != p.get_default("repeats"):
        p.error("--repeats is for --replay only (a sweep simulates each trace once): drop it")
    sweep_only = [f"--{name}" for name in ("profile", "rates", "seconds", "traces", "cv2", "depth")
                  if args.replay is not None and getattr(args, name) != p.get_default(name)]
    if sweep_only:
        p.error(f"{', '.join(sweep_only)}: not used with --replay, which rebuilds its run's own traces: drop "
                f"{'it' if len(sweep_only) == 1 else 'them'}")
    if args.replay is None and (args.profile is None or args.rates is None):
        p.error("give --profile and --rates (a sweep), or --replay RESULT (that run's own traces)")
    if args.replay is None and max(args.rates) * args.seconds > MAX_TRACE_REQUESTS:
        p.error(f"--rates {max(args.rates):g} x --seconds {args.seconds:g} makes traces of ~"
                f"{max(args.rates) * args.seconds:,.0f} requests; at most {MAX_TRACE_REQUESTS:,}: lower one of them")
    try:
        if args.replay is not None:
            result = read_result(args.replay, "--replay", REPLAY_NEEDS)
            if args.seed is None and result.get("seed") is None:
                raise ValueError(f"--replay {args.replay} does not record the load test's seed (written before it "
                                 f"did): pass --seed, the --seed that run was given")
        else:
            profile = read_result(args.profile, "--profile", SWEEP_NEEDS)
        check_output_dir(args.out, "--out")
    except ValueError as e:
        p.error(str(e))
    if args.replay is not None:
        return main_replay(args, result)
    args.seed = 0 if args.seed is None else args.seed
    start = time.perf_counter()
    rows = sweep(profile, args.rates, args.seconds, args.traces, args.cv2, args.depth, args.load, args.noise, args.seed)
    wall = time.perf_counter() - start
    m = profile["machine"]
    result = {"scenario": args.scenario, "simulated": True, "profile": str(args.profile),
              "profile_machine": f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime "
                                 f"{m['onnxruntime']}, git {m['git']}, {m['date']}",
              "model": profile["model"], "slo_ms": profile["slo_ms"], "max_batch": profile["max_batch"],
              "accuracy": profile["accuracy"], "accuracy_source": profile["accuracy_source"],
              "static_pick": static_pick(profile["latency_us"], profile["accuracy"], profile["slo_ms"]),
              "seconds": args.seconds, "traces": args.traces, "cv2": args.cv2, "depth": args.depth,
              "load": args.load, "noise": args.noise, "seed": args.seed, "reserve_share": _share_settings(),
              "wall_s": wall, "machine": machine(), "rows": rows,
              "goals": goals(rows, profile["accuracy"])}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{args.scenario}.json", json.dumps(result, indent=1) + "\n")
    write_text(args.out / f"{args.scenario}.md", markdown(result))
    print(markdown(result))
    return 0


def main_replay(args: argparse.Namespace, result: dict) -> int:
    seed = result["seed"] if args.seed is None else args.seed
    rows = replay(result, seed, args.load, args.noise, args.repeats)
    m = result["machine"]
    out = {"scenario": args.scenario, "simulated": True, "replayed": str(args.replay), "seed": seed,
           "rounds": result["rounds"], "seconds": result["seconds"], "repeats": args.repeats, "load": args.load,
           "noise": args.noise, "http_machine": f"{m['cpu']}, {m['cores']} cores, git {m['git']}, {m['date']}",
           "machine": machine(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{args.scenario}.json", json.dumps(out, indent=1) + "\n")
    write_text(args.out / f"{args.scenario}.md", replay_markdown(out))
    print(replay_markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
