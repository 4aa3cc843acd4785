"""Model configuration as typed dataclasses.

Every field carries an attribute docstring, which jsonargparse (and so
LightningCLI) turns into ``--help`` text. Configs validate themselves on
construction, so a bad value fails at the command line, not mid-training.
"""

import numbers
from dataclasses import dataclass, field
from typing import Literal, get_args

from spiking_lm.neuron import Backend, NeuronSpec, check_backend, check_choice

Attention = Literal["softmax", "spiking", "none"]
MLPActivation = Literal["gelu", "lif"]
AttnNorm = Literal["count", "length"]
AttnCentering = Literal["none", "row_max"]
AttnReadout = Literal["step", "cumulative"]


@dataclass(frozen=True)
class NeuronConfig(NeuronSpec):
    """Settings of the LIF neurons at one kind of site (attention scores, Q/K/V or MLP)."""

    learn_beta: bool = False
    """Learn the decay (per channel at Q/K/V and MLP sites, one scalar at attention-score sites)."""
    learn_threshold: bool = True
    """Learn the threshold (per channel at Q/K/V and MLP sites, per head at attention-score sites)."""
    adaptive_threshold: bool = False
    """Scale the threshold by the running mean of |input| at the site (SpikingBrain's V_th = mean|x| / k, with
    ``threshold`` as 1/k): the batch's mean while training, a running average of it (momentum 0.1) in eval."""
    amplitude: bool = False
    """Learn a per-channel amplitude that multiplies the outputs; it folds into the next layer's weights, so the
    layer still adds integers (not at attention-score sites)."""

    def __post_init__(self):
        """Left to the ModelConfig holding it, so that an error names the site (attn_neuron, qkv_neuron, ...)."""


def _attn_neuron() -> NeuronConfig:
    # Scores start near zero (std ~0.05 with nanoGPT's init); with beta 0.5 a constant
    # input x settles at 2x, so a low threshold lets the strongest (query, key) pairs
    # fire from the first step instead of leaving attention silent at initialisation.
    return NeuronConfig(threshold=0.1)


def _proj_in_neuron() -> NeuronConfig:
    # The attention output is a weighted mean of V rows, ~0.2 in size at nanoGPT's init, where a
    # threshold of 1 would leave the site silent; the LayerNorm-fed sites see unit-scale inputs.
    return NeuronConfig(threshold=0.1)


@dataclass
class ModelConfig:
    """A GPT whose attention softmax and MLP activation may each be replaced by LIF neurons."""

    vocab_size: int = 0
    """Vocabulary size; 0 means "not set": the trainer fills it from the data module."""
    block_size: int = 64
    """Longest context, in tokens."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches, in [0, 1)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms."""
    attention: Attention = "spiking"
    """Attention weights from "softmax" (causal scaled dot product) or from LIF neurons on the scores ("spiking");
    "none" drops attention, the no-context reference."""
    mlp_activation: MLPActivation = "lif"
    """Activation between the MLP's two linear layers: "gelu" or LIF neurons ("lif")."""
    timesteps: int = 4
    """Simulation steps S each token is presented for (direct encoding); unused without LIF sites."""
    spiking_qkv: bool = False
    """Pass Q, K and V through LIF neurons before attention (Spikformer-style)."""
    spiking_qkv_in: bool = False
    """Spike-driven Q/K/V projection: LIF neurons (site ``layer{i}.qkv_in``) on the layer-normed residual, so
    that the projection's input is spikes."""
    spiking_proj_in: bool = False
    """Spike-driven attention output projection: LIF neurons (site ``layer{i}.proj_in``) on the heads' output
    before it."""
    spiking_fc_in: bool = False
    """Spike-driven MLP: LIF neurons (site ``layer{i}.fc_in``) on the layer-normed residual before the MLP's
    first layer. With the three spike-driven inputs and mlp_activation "lif", every linear layer inside a block
    is fed by spikes; the embeddings, the final LayerNorm and lm_head stay real."""
    attn_norm: AttnNorm = "count"
    """Spiking attention's fixed normalisation per query row: that step's spike count ("count", at least 1)
    or the causal prefix length ("length")."""
    attn_centering: AttnCentering = "row_max"
    """What spiking attention's score neurons compare against: the raw scaled score ("none"), or the score
    minus the best causal score of its query row plus the threshold ("row_max"), so that every row fires on
    its best keys."""
    attn_readout: AttnReadout = "cumulative"
    """Spiking attention's weights at step t: that step's spikes ("step"), or each key's spike count up to t
    ("cumulative", a graded weight)."""
    attn_neuron: NeuronConfig = field(default_factory=_attn_neuron)
    """Neurons on the attention scores; threshold defaults to 0.1 because scores start near 0."""
    qkv_neuron: NeuronConfig = field(default_factory=NeuronConfig)
    """Neurons on Q, K and V when spiking_qkv is set."""
    mlp_neuron: NeuronConfig = field(default_factory=NeuronConfig)
    """Neurons between the MLP's linear layers when mlp_activation is "lif"."""
    qkv_in_neuron: NeuronConfig = field(default_factory=NeuronConfig)
    """Neurons before the Q/K/V projection when spiking_qkv_in is set."""
    proj_in_neuron: NeuronConfig = field(default_factory=_proj_in_neuron)
    """Neurons before the attention output projection when spiking_proj_in is set; threshold defaults to 0.1
    because the heads' output starts small."""
    fc_in_neuron: NeuronConfig = field(default_factory=NeuronConfig)
    """Neurons before the MLP's first layer when spiking_fc_in is set."""
    backend: Backend = "auto"
    """LIF implementation: "torch" (reference loop), "triton" (fused kernels) or "auto" (triton on CUDA)."""

    def __post_init__(self):
        # A checkpoint's dataclasses.asdict() gives nested dicts; rebuild them.
        for name in ("attn_neuron", "qkv_neuron", "mlp_neuron", "qkv_in_neuron", "proj_in_neuron", "fc_in_neuron"):
            value = getattr(self, name)
            if not isinstance(value, dict | NeuronConfig):
                raise TypeError(f"{name} must be a NeuronConfig, got {type(value).__name__}")
            try:
                value = NeuronConfig(**value) if isinstance(value, dict) else value
                value.validate()
                if name == "attn_neuron" and (value.code, value.gradient) != ("binary", "surrogate"):
                    raise ValueError("attention-score neurons support only code 'binary' and gradient 'surrogate'")
                if name == "attn_neuron" and (value.adaptive_threshold or value.amplitude):
                    raise ValueError("attention-score neurons take no adaptive_threshold or amplitude")
                if name == "qkv_neuron" and value.code == "graded":
                    # spiking_lm.eval.energy counts one AC per nonzero product of spiking Q and K
                    raise ValueError("spiking Q/K/V take code 'binary' or 'signed', not 'graded'")
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            setattr(self, name, value)
        for name, low in (
            ("vocab_size", 0),
            ("block_size", 1),
            ("n_layer", 1),
            ("n_head", 1),
            ("n_embd", 1),
            ("timesteps", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (
            ("attention", get_args(Attention)),
            ("mlp_activation", get_args(MLPActivation)),
            ("attn_norm", get_args(AttnNorm)),
            ("attn_centering", get_args(AttnCentering)),
            ("attn_readout", get_args(AttnReadout)),
        ):
            check_choice(name, getattr(self, name), allowed)
        check_backend(self.backend)
