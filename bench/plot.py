"""Tables and a plot from benchmark rows (bench/_harness.py writes them; bench/gpu_check.sh runs this).

    python bench/plot.py [--results DIR_OR_FILE ...] [--out DIR] [--include-smoke]

Reads every ``*.json`` row list under the results paths, sub-folders included (default: bench/results/), and
writes into ``--out`` (default: the first results folder):
  results.md          markdown: per environment (card, driver, versions, git sha) a latency table per model and
                      batch (sub-networks x providers, median µs, with the MACs and the engine / best
                      torch.compile ratio), then switching-cost, memory, training-step and single-layer tables when
                      such rows exist;
  latency_vs_macs.png median latency (p20-p80 bars) against MACs, one panel per model and batch, one line per
                      provider, each point labelled with its sub-network, no label on another (needs matplotlib;
                      the markdown is written without it).
JSON files that are not row lists (e.g. training results) are ignored; smoke rows (CPU runs) are left out unless
``--include-smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

if not __package__:  # run as a script (python bench/plot.py): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adaptive_kernels._files import atomic_path, write_text
from adaptive_kernels.training.evaluate import place_labels
from bench._rows import ENV_KEYS, PROVIDERS, ROW_KEYS

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def load_rows(paths: Iterable[Path]) -> list[dict]:
    """All benchmark rows in the given files / folders (``*.json``, sorted). Raises ValueError on broken JSON."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"results path {path} does not exist")
    rows = []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}); fix or remove it") from None
        if isinstance(data, list) and data and all(isinstance(r, dict) and set(ROW_KEYS) <= r.keys() for r in data):
            rows += data
    return rows


def is_latency(row: dict) -> bool:
    return row.get("metric", "latency") == "latency"


def environment_of(row: dict) -> tuple:
    return tuple(row.get(k) for k in ENV_KEYS)


def describe_environment(env: tuple) -> str:
    e = dict(zip(ENV_KEYS, env, strict=True))
    return (
        f"{e['gpu']} (driver {e['driver']}), torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, "
        f"git {str(e['git_sha'])[:12]}"
    )


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_table_head(title: str, header: list[str]) -> list[str]:
    """A markdown table's title, a blank line, its header row and the separator row."""
    return [title, "", _md_row(header), "|" + "---|" * len(header)]


def _ordered(names: set[str]) -> list[str]:
    """Provider names (or table columns) in PROVIDERS order, others after them, sorted."""
    return [p for p in PROVIDERS if p in names] + sorted(names - set(PROVIDERS))


def _providers(rows: Iterable[dict]) -> list[str]:
    return _ordered({r["provider"] for r in rows})


def _column(row: dict) -> str:
    """A latency table's column: the provider, with "+autotune" for an engine whose kernels were autotuned (its
    rows then stand beside the untuned ones instead of replacing them)."""
    tuned = row.get("autotune") and row["provider"].startswith("engine")
    return row["provider"] + ("+autotune" if tuned else "")


def latency_tables(rows: list[dict]) -> str:
    """Markdown: per (model, batch, dtype), sub-networks by falling MACs x providers (median µs)."""
    groups: dict[tuple, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in rows:
        if is_latency(r):
            groups[(r["model"], r["batch"], r["dtype"])][(r["skip"], _column(r))] = r  # later rows win
    out = []
    for (model, batch, dtype), cells in sorted(groups.items()):
        providers = _ordered({column for _, column in cells})
        macs = {skip: r["macs"] for (skip, _), r in cells.items()}
        skips = sorted(macs, key=lambda s: (-(macs[s] or 0), s))
        ratio = any(p.startswith("engine") for p in providers) and any(p.startswith("compile") for p in providers)
        header = ["sub-network", "GMACs", *providers] + (["best engine / best compile"] if ratio else [])
        out += _md_table_head(f"**{model}**, batch {batch}, {dtype} — median latency, µs", header)
        for skip in skips:
            medians = {p: cells[(skip, p)]["median_us"] for p in providers if (skip, p) in cells}
            line = [
                skip,
                f"{macs[skip] / 1e9:.3f}" if macs[skip] else "—",
                *(_fmt_us(medians.get(p)) for p in providers),
            ]
            if ratio:
                engine = [v for p, v in medians.items() if p.startswith("engine") and v]
                compiled = [v for p, v in medians.items() if p.startswith("compile") and v]
                line.append(f"{min(engine) / min(compiled):.2f}" if engine and compiled else "—")
            out.append(_md_row(line))
        out.append("")
    return "\n".join(out)


def switching_tables(rows: list[dict]) -> str:
    """Markdown: per model, what making sub-networks available and switching cost, and memory, per provider."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("metric") in ("make_available", "switch", "set_skip", "memory"):
            by_model[r["model"]].append(r)
    out = []
    for model, rs in sorted(by_model.items()):
        out += _md_table_head(
            f"**{model}**, batch {rs[0]['batch']} — making sub-networks available and switching",
            [
                "provider",
                "sub-networks made available",
                "first (s)",
                "each later one (s, mean)",
                "compiled past recompile limit",
                "switch cost (µs/call)",
                "set_skip (µs)",
                "peak memory (MiB)",
            ],
        )
        for provider in _providers(rs):
            mine = [r for r in rs if r["provider"] == provider]
            made = [r for r in mine if r["metric"] == "make_available"]
            switch = next((r for r in mine if r["metric"] == "switch"), None)
            set_skip = next((r for r in mine if r["metric"] == "set_skip"), None)
            memory = next((r for r in mine if r["metric"] == "memory"), None)
            later = [r["setup_s"] for r in made[1:]]
            limit = [r for r in made if r.get("recompile_limit_hit")]
            past = (
                "—"
                if provider != "compile"
                else (
                    f"no: from #{made.index(limit[0]) + 1} on, {sum(r['new_graphs'] == 0 for r in made)} ran uncompiled"
                    if limit
                    else "limit not reached"
                )
            )
            out.append(
                _md_row(
                    [
                        provider,
                        str(len(made)),
                        f"{made[0]['setup_s']:.3f}" if made else "—",
                        f"{sum(later) / len(later):.3f}" if later else "—",
                        past,
                        _fmt_us(switch.get("switch_us")) if switch else "—",
                        _fmt_us(set_skip["median_us"]) if set_skip else "—",
                        f"{memory['peak_alloc_bytes'] / 2**20:.0f}" if memory else "—",
                    ]
                )
            )
        out.append("")
    return "\n".join(out)


def train_tables(rows: list[dict]) -> str:
    """Markdown: training-step time per mode and the ADN / plain ratio (the paper: about one ordinary run)."""
    steps: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("metric") == "train_step":
            steps[(r["model"], r["batch"], r["dtype"])][r["step_mode"]] = r
    if not steps:
        return ""
    out = _md_table_head(
        "Training step (median ms per step; images/s)",
        ["model", "batch", "autocast", "adn", "plain", "single (base depth)", "adn / plain"],
    )

    def cell(r: dict | None) -> str:
        return f"{r['median_us'] / 1e3:.1f} ({r['images_per_s']:.0f}/s)" if r else "—"

    for (model, batch, dtype), modes in sorted(steps.items()):
        ratio = (
            f"{modes['adn']['median_us'] / modes['plain']['median_us']:.2f}"
            if "adn" in modes and "plain" in modes
            else "—"
        )
        per_mode = " | ".join(cell(modes.get(mode)) for mode in ("adn", "plain", "single"))
        out.append(f"| {model} | {batch} | {dtype} | {per_mode} | {ratio} |")
    out.append("")
    return "\n".join(out)


def layer_tables(rows: list[dict]) -> str:
    """Markdown: per batch, layers x providers (median µs per layer call) from bench/test_kernels_layers.py."""
    groups: dict[tuple, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in rows:
        if r.get("metric") == "layer_latency":
            groups[(r["batch"], r["dtype"])][(r["model"], r["provider"])] = r
    out = []
    for (batch, dtype), cells in sorted(groups.items()):
        providers = _providers(cells.values())
        layers = list(dict.fromkeys(layer for layer, _ in cells))
        out += _md_table_head(f"Single layers, batch {batch}, {dtype} — median µs per call", ["layer", *providers])
        for layer in layers:
            line = [layer] + [
                _fmt_us(cells[(layer, p)]["median_us"]) if (layer, p) in cells else "—" for p in providers
            ]
            out.append(_md_row(line))
        out.append("")
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    """Every table, one section per environment, the card and versions above its numbers."""
    by_env: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_env[environment_of(r)].append(r)
    out = []
    for env, rs in sorted(by_env.items(), key=lambda kv: str(kv[0])):
        modes = sorted({r.get("mode", "full") for r in rs})
        out += [f"### {describe_environment(env)}" + (" — SMOKE (CPU) rows" if "smoke" in modes else ""), ""]
        for part in (latency_tables(rs), switching_tables(rs), train_tables(rs), layer_tables(rs)):
            if part:
                out.append(part)
    return "\n".join(out).rstrip() + "\n"


def plot_latency(rows: list[dict], path: Path) -> bool:
    """latency vs MACs per provider, one panel per (model, batch); False (nothing written) without matplotlib or
    without latency rows."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = latency_figure(rows)
    if fig is None:
        return False
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def latency_figure(rows: list[dict]):
    """The figure ``plot_latency`` saves (pyplot set up by it), None without latency rows."""
    import matplotlib.pyplot as plt

    latency = [r for r in rows if is_latency(r) and r["macs"] and r["median_us"]]
    panels = sorted({(r["model"], r["batch"], r["dtype"]) for r in latency})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    labels: list[list[tuple[float, float, str, str]]] = []
    for ax, (model, batch, dtype) in zip(axes[0], panels, strict=True):
        mine = [r for r in latency if (r["model"], r["batch"], r["dtype"]) == (model, batch, dtype)]
        labels.append([])
        for i, provider in enumerate(_providers(mine)):
            pts = sorted(
                (r["macs"] / 1e9, r["median_us"], r["p20_us"], r["p80_us"], r["skip"])
                for r in mine
                if r["provider"] == provider
            )
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, lw=1, capsize=2, label=provider, color=f"C{i}")
            labels[-1] += [(p[0], p[1], p[4], f"C{i}") for p in pts]  # each point named by its sub-network
        ax.set_yscale("log")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("median latency (µs), p20–p80")
        ax.set_title(f"{model}, batch {batch}, {dtype}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.margins(0.12)  # room for the labels beside the outermost points
    envs = sorted({describe_environment(environment_of(r)) for r in latency})
    fig.suptitle("; ".join(envs), fontsize=8)
    fig.tight_layout()
    for ax, points in zip(axes[0], labels, strict=True):
        place_labels(fig, ax, points)  # sub-networks of equal MACs share an x: their labels beside and above
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        nargs="+",
        type=Path,
        default=[DEFAULT_RESULTS],
        help="row files or folders of *.json (default: bench/results/)",
    )
    parser.add_argument("--out", type=Path, help="where results.md and the PNG go (default: first results folder)")
    parser.add_argument("--include-smoke", action="store_true", help="keep CPU smoke rows")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    if not args.include_smoke:
        rows = [r for r in rows if r.get("mode", "full") != "smoke"]
    out = args.out or (args.results[0] if args.results[0].is_dir() else args.results[0].parent)
    if not rows:
        print(
            f"no benchmark rows in {', '.join(map(str, args.results))} (smoke rows need --include-smoke)",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.md", markdown(rows))
    png = out / "latency_vs_macs.png"
    drew = plot_latency(rows, png)
    print(
        f"wrote {out / 'results.md'}" + (f" and {png}" if drew else " (no PNG: matplotlib missing or no latency rows)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
