"""spiking-lm: language models whose softmax and MLP activations are LIF neurons with refractory periods."""

from spiking_lm.lif import LIF, FiringStats, lif

__all__ = ["LIF", "FiringStats", "lif"]
__version__ = "0.1.0"
