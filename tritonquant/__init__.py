"""tritonquant: activation-compressed training for PyTorch.

    import tritonquant as tq

    with tq.compress(bits=4) as session:     # every tensor autograd saves is packed
        loss = model(batch)
    loss.backward()                          # and restored here
    print(session.report())

    handle = tq.attach(model, bits=4)        # or: compress every forward of `model`

    p = tq.quantize(x, bits=4)               # -> tq.PackedTensor
    x_hat = tq.dequantize(p)                 # same shape, dtype and device as x (strides: docs/format.md)
"""

from .autobits import calibrate, recalibrate
from .codec import dequantize, manual_seed, quantize
from .config import CompressConfig, QuantConfig
from .packed import PackedTensor
from .session import AttachHandle, Session, Stats, attach, compress

__all__ = [
    "AttachHandle",
    "CompressConfig",
    "PackedTensor",
    "QuantConfig",
    "Session",
    "Stats",
    "attach",
    "calibrate",
    "compress",
    "dequantize",
    "manual_seed",
    "quantize",
    "recalibrate",
]
__version__ = "0.1.0"
