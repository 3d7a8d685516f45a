"""Triton kernels of tritonquant, each launcher (``triton_*``) beside its plain-torch reference (``torch_*``).

Installed as ``tritonquant.kernels``. Only ``tritonquant.codec`` chooses between the two.
"""

from .bitpack import torch_pack_bool, torch_unpack_bool, triton_pack_bool, triton_unpack_bool
from .dequantize import (ACTIVATIONS, PreparedDequantize, dequantize_prepared, prepare_dequantize, torch_activation,
                         torch_dequantize, triton_dequantize)
from .pool_indices import (PoolWindows, torch_decode_pool_indices, torch_encode_pool_indices,
                           triton_decode_pool_indices, triton_encode_pool_indices)
from .quantize import (PreparedQuantize, payload_nbytes, philox_counters, prepare_quantize, quantize_prepared,
                       torch_quantize, triton_quantize)

__all__ = [
    "ACTIVATIONS",
    "PoolWindows",
    "PreparedDequantize",
    "PreparedQuantize",
    "dequantize_prepared",
    "payload_nbytes",
    "philox_counters",
    "prepare_dequantize",
    "prepare_quantize",
    "quantize_prepared",
    "torch_activation",
    "torch_decode_pool_indices",
    "torch_dequantize",
    "torch_encode_pool_indices",
    "torch_pack_bool",
    "torch_quantize",
    "torch_unpack_bool",
    "triton_decode_pool_indices",
    "triton_dequantize",
    "triton_encode_pool_indices",
    "triton_pack_bool",
    "triton_quantize",
    "triton_unpack_bool",
]
