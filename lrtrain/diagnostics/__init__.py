"""Spectral diagnostics of dense and factored layers, on their own cadence.

`Diagnostics(reference_params)(params)` returns a flat dict of
slash-namespaced metrics (spectral/<layer>/stable_rank,
intruders/<layer>/maxsim, intruders/total, params/compression, ...); every
key is defined in docs/diagnostics.md. `GradientDiagnostics` adds the
stable rank of each layer's full-weight gradient (grad/<layer>/...) and the
overlap of consecutive weight-update subspaces (update/<layer>/...).
`plots.render` turns a run's metrics.jsonl into figures.
"""

from lrtrain.diagnostics import gradients, heavy_tail, intruders, spectral
from lrtrain.diagnostics.core import Diagnostics, find_layers, layer_matrix
from lrtrain.diagnostics.gradients import GradientDiagnostics
from lrtrain.diagnostics.intruders import count_from_maxsim

__all__ = ["Diagnostics", "GradientDiagnostics", "find_layers", "layer_matrix",
           "count_from_maxsim", "gradients", "heavy_tail", "intruders",
           "spectral"]
