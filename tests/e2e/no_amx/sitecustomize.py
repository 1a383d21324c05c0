"""Imported at start-up by every process of a server whose PYTHONPATH names this folder (tests only).

torch then reports a CPU without AMX, so vLLM takes the kernels such a CPU gets (its int8 matmul through
oneDNN, which releases the layer's weight) on a machine that has AMX: both kernel paths are tested anywhere.
"""

import torch

torch.cpu._is_amx_tile_supported = lambda: False
