"""Numbers the fused kernels and their PyTorch reference (``spiking_lm.spiking_attention_reference``) share.

Nothing here imports triton, so the reference runs where triton is not installed.
"""

ROW_MAX_CURRENT = 1.5
"""Current of the best key of a query row under centering="row_max", in units of the threshold: above 1, so it
fires on the first step rather than after integrating."""
