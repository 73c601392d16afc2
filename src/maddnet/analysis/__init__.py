"""Studies built on the core: AMM sweeps, single-layer analysis, reports."""
