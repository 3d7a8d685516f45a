"""offload="cpu": packed activations wait in pinned host memory between forward and backward.

    with tq.compress(bits=4, offload="cpu"):
        loss = model(batch)          # each packed payload is copied to the host, the GPU copy released
    loss.backward()                  # copied back shortly before backward needs it

Forward (pack): once a tensor has been quantized on the GPU, its payload and metadata are copied to
pinned host memory on a side stream ("d2h") that first waits for the compute stream, so the copy
overlaps the rest of the forward. ``record_stream`` keeps the caching allocator from reusing the GPU
copy before that copy has finished; after that the GPU memory is free. Only the host copy is kept.

Backward (unpack): autograd unpacks roughly in the reverse of the packing order. Each unpack queues the
host-to-device copies of the next ``depth`` earlier packed tensors on a second side stream ("h2d"),
each after its d2h copy has finished, and records an event; the compute stream waits on that event
before dequantizing. A tensor that was not prefetched (the first one, or a branchy backward order) is
fetched on demand the same way. The GPU copy is dropped right after dequantize, the host copy kept, so
``retain_graph=True`` and ``grad_fn._saved_*`` still work.

CPU tensors: their packed payloads already live in host memory, so there is nothing to move and
offload="cpu" leaves them exactly as without it (a documented no-op; ``Stats.offloaded_bytes`` stays 0).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from .packed import PackedTensor

# Packed tensors copied back ahead of the one backward is unpacking. A few suffice to hide the copy of
# one layer behind the backward of the next; more only hold GPU memory longer.
DEFAULT_PREFETCH_DEPTH = 4


class OffloadedPacked:
    """A packed tensor whose payload lives in host memory (pinned, for CUDA tensors).

    host: the PackedTensor with payload and meta on the CPU.
    device: where the original tensor lived, and where ``Offloader.fetch`` restores it.
    stored: event recorded after the device-to-host copy (None when no CUDA copy was made).
    index: position in the offloader's packing order (used to prefetch earlier ones).
    fetches: how often backward has fetched it (prefetch skips those already used once).
    offloader: the Offloader that made it (``fetch`` goes through it).
    """

    __slots__ = ("host", "device", "stored", "index", "fetches", "prefetched", "offloader", "__weakref__")

    def __init__(self, host: PackedTensor, device: torch.device, stored, index: int, offloader: "Offloader") -> None:
        self.offloader = offloader
        self.host = host
        self.device = device
        self.stored = stored
        self.index = index
        self.fetches = 0
        # (device PackedTensor, event marking the end of its copy) queued ahead of use, or None.
        self.prefetched: tuple[PackedTensor, object] | None = None


class Offloader:
    """Moves packed payloads to host memory and back for one compression scope.

    copy_cpu: also "offload" CPU tensors by copying them to new host tensors. Only for exercising the
        bookkeeping (order, prefetch, retained graphs) on machines without a GPU; it saves nothing.
    """

    def __init__(self, depth: int = DEFAULT_PREFETCH_DEPTH, *, copy_cpu: bool = False) -> None:
        self.depth = depth
        self.copy_cpu = copy_cpu
        self.prefetches = 0
        self.fetches_on_demand = 0
        self._order: list[weakref.ref] = []

    def wants(self, packed: PackedTensor) -> bool:
        """True when ``packed`` should move to the host (its payload is on a CUDA device)."""
        return packed.device.type == "cuda" or (self.copy_cpu and packed.device.type == "cpu")

    # -- forward ----------------------------------------------------------------------------------

    def offload(self, packed: PackedTensor) -> OffloadedPacked:
        """Start copying ``packed`` to host memory; the returned entry replaces it in the saved graph."""
        device = packed.device
        if device.type == "cuda":
            _refuse_capture()
            d2h, _ = self._streams_for(device)
            with torch.cuda.device(device):
                # The payload was written by kernels on the compute stream: copy only after them.
                d2h.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(d2h):
                    host = _move(packed, torch.device("cpu"), pin=True)
                for t in _tensors(packed):
                    t.record_stream(d2h)  # not reused by the allocator before the copy has read it
                stored = torch.cuda.Event()
                stored.record(d2h)
        else:
            host, stored = _move(packed, torch.device("cpu"), pin=False), None
        entry = OffloadedPacked(host, device, stored, len(self._order), self)
        self._order.append(weakref.ref(entry))
        return entry

    # -- backward ---------------------------------------------------------------------------------

    def fetch(self, entry: OffloadedPacked) -> PackedTensor:
        """The packed tensor back on its device, ready to read on the current stream.

        Queues the copies of up to ``depth`` earlier entries before returning. The host copy is kept.
        """
        if entry.device.type == "cuda":
            _refuse_capture()  # (a backward captured alone: its copies would wait on events from outside)
        if entry.prefetched is not None:
            device_packed, ready = entry.prefetched
            entry.prefetched = None
        else:
            device_packed, ready = self._copy_in(entry)
            self.fetches_on_demand += 1
        entry.fetches += 1
        self._prefetch_before(entry.index)
        if ready is not None:
            compute = torch.cuda.current_stream(entry.device)
            compute.wait_event(ready)
            for t in _tensors(device_packed):
                # Allocated on the h2d stream, read on this one: keep it until this stream is done.
                t.record_stream(compute)
        return device_packed

    def _prefetch_before(self, index: int) -> None:
        for j in range(index - 1, max(index - 1 - self.depth, -1), -1):
            earlier = self._order[j]()
            if earlier is None or earlier.fetches or earlier.prefetched is not None:
                continue
            earlier.prefetched = self._copy_in(earlier)
            self.prefetches += 1

    def _copy_in(self, entry: OffloadedPacked) -> tuple[PackedTensor, object]:
        if entry.device.type != "cuda":
            return _move(entry.host, entry.device, pin=False), None
        _, h2d = self._streams_for(entry.device)
        with torch.cuda.device(entry.device):
            h2d.wait_event(entry.stored)  # the host copy must be complete before it is read
            with torch.cuda.stream(h2d):
                device_packed = _move(entry.host, entry.device, pin=False)
            ready = torch.cuda.Event()
            ready.record(h2d)
        return device_packed, ready

    @staticmethod
    def _streams_for(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """The (device-to-host, host-to-device) copy streams of ``device``, one pair per process: torch
        hands out new streams round-robin from a small pool, so a pair per session (attach() opens one
        per forward) would sooner or later be the user's own side stream, and the copies would queue
        behind its work."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        streams = _COPY_STREAMS.get(index)
        if streams is None:
            streams = _COPY_STREAMS.setdefault(index, (torch.cuda.Stream(index), torch.cuda.Stream(index)))
        return streams


_COPY_STREAMS: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _refuse_capture() -> None:
    # Pinned host memory is recycled by polling events, which a capture forbids, and a replay would not
    # run the bookkeeping of offload() and fetch(): refuse rather than record half of it.
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "offload='cpu' cannot run inside a CUDA graph capture: it moves packed tensors through "
            "pinned host memory with host-side bookkeeping that a graph replay does not repeat. "
            "Capture the step with offload=None, or run it eagerly to offload."
        )


def _tensors(packed: PackedTensor) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in (packed.payload, packed.meta, packed.channels) if t is not None)


def _move(packed: PackedTensor, device: torch.device, *, pin: bool) -> PackedTensor:
    """A copy of ``packed`` with its tensors (payload, meta, channel statistics) on ``device``
    (non-blocking between CPU and CUDA).

    Copies run on the current stream; the caller picks it. ``pin`` allocates page-locked host memory,
    which device-to-host copies need to be asynchronous.
    """

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if device.type == "cpu":
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            return out.copy_(t, non_blocking=pin)
        return t.to(device, non_blocking=True)

    return dataclasses.replace(
        packed, payload=move(packed.payload), meta=move(packed.meta), channels=move(packed.channels)
    )
