"""tritonquant: activation-compressed training for PyTorch.

    import tritonquant as tq
    p = tq.quantize(x, bits=4)        # -> tq.PackedTensor
    x_hat = tq.dequantize(p)          # same shape, dtype, device and strides as x
"""

from .codec import dequantize, manual_seed, quantize
from .config import QuantConfig
from .packed import PackedTensor

__all__ = ["PackedTensor", "QuantConfig", "dequantize", "manual_seed", "quantize"]
__version__ = "0.1.0"
