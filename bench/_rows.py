"""The benchmark row format, shared by ``_harness.py`` (writes rows) and ``plot.py`` (reads them). Kept free of
torch so that plot.py runs on a machine without it."""

# A row's environment: the card and versions a number was measured with (``git_dirty`` is recorded too, but
# rows of one environment are grouped without it).
ENV_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "git_sha")
# Keys every row has; ``mode``, ``metric`` and metric-specific keys come on top.
ROW_KEYS = ("provider", "model", "skip", "batch", "dtype", "median_us", "p20_us", "p80_us", "macs", *ENV_KEYS)
# How a sub-network is run (bench/_harness.py describes each), in the order the tables list them.
PROVIDERS = ("eager", "cuda_graph", "compile", "compile_freeze", "engine_conditional", "engine_early_exit")
