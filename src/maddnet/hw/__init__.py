"""Hardware side of maddnet: the energy model of MADD networks (``maddnet energy``).

* :mod:`~maddnet.hw.costs`: the parameters (per-operation and per-byte constants with their
  sources, the technology scaling rule, the accelerator configuration);
* :mod:`~maddnet.hw.counts`: operation and memory-traffic counts per layer (MADD and dense);
* :mod:`~maddnet.hw.network`: the layer shapes of a registry model or a run folder;
* :mod:`~maddnet.hw.energy`: energies per layer and network, the headline reproduction;
* :mod:`~maddnet.hw.report`: energy.json/.csv/.md/.png;
* :mod:`~maddnet.hw.datapath`: a numpy model of the accelerator's datapath (FP16 encoder,
  integer LUT accumulator, de-quantisation; no torch);
* :mod:`~maddnet.hw.exact`: :func:`set_hw_exact`, MADD layers computing exactly that.
* :mod:`~maddnet.hw.export`: ``maddnet export`` (tables, ``$readmemh`` memories, golden
  vectors); :mod:`~maddnet.hw.hw_check`: ``maddnet hw-check``, its torch-free reader and check.

The model, its constants and what they assume: docs/hardware.md.
"""

from .costs import AcceleratorConfig, CostModel, EnergyConstants, load_cost_model
from .counts import LayerShape, MaddParams, dense_counts, madd_counts, record_shapes
from .datapath import AccumulatorOverflowError
from .energy import NetworkEstimate, estimate, headline
from .exact import set_hw_exact
from .network import Network, load_network

__all__ = [
    "AccumulatorOverflowError",
    "AcceleratorConfig",
    "CostModel",
    "EnergyConstants",
    "LayerShape",
    "MaddParams",
    "Network",
    "NetworkEstimate",
    "dense_counts",
    "estimate",
    "headline",
    "load_cost_model",
    "load_network",
    "madd_counts",
    "record_shapes",
    "set_hw_exact",
]
