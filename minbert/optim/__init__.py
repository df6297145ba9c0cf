"""Optimizers for memory-efficient training: GaLore (gradient low-rank projection) AdamW, AdamW with
block-wise 8-bit states, the 8-bit quantizer they use, and a count of the bytes an optimizer's
state holds."""
from minbert.optim.adamw8 import AdamW8bit, adam_moments
from minbert.optim.galore import GaLoreAdamW, GaLoreProjector, optimizer_state_bytes
from minbert.optim.quant import QuantizedTensor, dynamic_map, quantize

__all__ = ["AdamW8bit", "GaLoreAdamW", "GaLoreProjector", "QuantizedTensor", "adam_moments",
           "dynamic_map", "optimizer_state_bytes", "quantize"]
