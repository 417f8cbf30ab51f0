"""Where offloaded tensors go, and the device specifics of getting them there and back.

The engine (`tightfit.offload.engine`) never touches streams, events or pinned memory itself; it asks a
`Target` for five things: whether a tensor lives on the device it offloads from (`accepts`), a host
buffer of an exact size (`alloc_host` / `free_host`), an asynchronous device-to-host copy that returns an
event (`to_host`), an asynchronous host-to-device copy that returns the new device storage and an event
(`to_device`), and event handling (`done`, `synchronize`, `wait`: the compute stream waits on an event,
the host does not). Copies run in the order they are issued (one side stream), so a host buffer can be
reused for a copy out while an earlier copy back from it may still be running.

- `CudaTarget`: copies on one side stream, CUDA events, host buffers pinned at their exact size with
  ``cudaHostRegister`` (torch's pinned allocator rounds every request up to a power of two).
- `SimulatedTarget`: CPU tensors play the device, other CPU tensors the host; the side stream is a queue
  of copies that run later (when an event is waited on, or after ``copy_delay`` polls), so the
  asynchrony, and any engine bug that frees a device tensor before its copy ran, show up on a CPU. It is
  what the tests and the benchmarks' dry runs use; it saves no memory.

NOTE [ No early free ]: a copy reads a device storage that the engine keeps referenced until the copy's
event has completed. `SimulatedTarget` holds the source only through a weak reference, so a storage freed
before its (deferred) copy runs is caught as a race (`SimulatedTarget.races`, and a RuntimeError). Host
buffers likewise: `SimulatedTarget.free_host` raises when a queued copy still reads or writes the buffer
(a prefetch that was never waited on must finish before its buffer is unpinned and freed).
"""

from __future__ import annotations

import collections
import time
import weakref
from typing import Any

import torch

__all__ = ["CudaTarget", "SimulatedTarget", "Target", "available", "target_for"]

PIN_MODES = ("register", "torch", "none")


class Target:
    """The device side of offloading (see the module docstring); subclasses implement every method."""

    device: torch.device
    simulated: bool = False

    def accepts(self, t: torch.Tensor) -> bool:
        """Whether `t` lives on the device this target offloads from."""
        raise NotImplementedError

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        """A host uint8 tensor of exactly `nbytes` bytes (pinned where the device supports it)."""
        raise NotImplementedError

    def free_host(self, buf: torch.Tensor) -> None:
        """Give back a buffer from `alloc_host` (unpins it)."""

    def to_host(self, storage: torch.UntypedStorage, host: torch.Tensor) -> Any:
        """Start copying a device storage into `host` after the work queued so far; return an event."""
        raise NotImplementedError

    def to_device(self, host: torch.Tensor) -> tuple[torch.UntypedStorage, Any]:
        """Start copying `host` into a new device storage; return it and an event (wait before reading)."""
        raise NotImplementedError

    def done(self, event: Any) -> bool:
        """Whether the copy behind `event` has completed (does not block)."""
        raise NotImplementedError

    def synchronize(self, event: Any) -> None:
        """Block the host until the copy behind `event` has completed."""
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` before its next kernel (the host does not block)."""
        raise NotImplementedError

    def bandwidth(self) -> float:
        """Host<->device copy bandwidth in bytes per second (measured or configured)."""
        raise NotImplementedError


def _uint8_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class CudaTarget(Target):
    """CUDA: one side stream for both directions, CUDA events, exact-size pinned host buffers.

    ``pin``: "register" (default: a pageable buffer of the exact size, then ``cudaHostRegister``),
    "torch" (``pin_memory=True``: torch's caching host allocator, which rounds each request up to a power
    of two), or "none" (pageable: the copies cannot overlap compute; for comparison only).
    """

    def __init__(self, device: torch.device | str | int | None = None, pin: str = "register") -> None:
        if pin not in PIN_MODES:
            raise ValueError(f"pin must be one of {PIN_MODES}, got {pin!r}")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaTarget offloads from a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.pin = pin
        self._side = torch.cuda.Stream(dev)
        self._bandwidth: float | None = None

    def accepts(self, t: torch.Tensor) -> bool:
        return t.device == self.device

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        if self.pin == "torch":
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pin == "register" and nbytes > 0:
            # flag 1 = cudaHostRegisterPortable (pinned for every CUDA context), as torch's own helper
            cudart = torch.cuda.cudart()
            code = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 1))
            if code != 0:
                # the failed call leaves CUDA's sticky "last error" set; clear it where the binding has
                # cudaGetLastError, so a later unrelated check does not report it
                clear = getattr(cudart, "cudaGetLastError", None)
                if clear is not None:
                    clear()
                raise RuntimeError(
                    f"cudaHostRegister of a {nbytes}-byte host buffer failed (cudaError {code}); "
                    "use CudaTarget(pin='torch') to pin through torch's allocator instead"
                )
        return buf

    def free_host(self, buf: torch.Tensor) -> None:
        if self.pin == "register" and buf.numel() > 0:
            code = int(torch.cuda.cudart().cudaHostUnregister(buf.data_ptr()))
            if code != 0:
                raise RuntimeError(f"cudaHostUnregister of a {buf.numel()}-byte host buffer failed "
                                   f"(cudaError {code})")

    def __getstate__(self) -> dict[str, Any]:  # a stream does not pickle: the copy makes its own
        return {"device": str(self.device), "pin": self.pin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["device"], pin=state["pin"])  # type: ignore[misc]

    def to_host(self, storage: torch.UntypedStorage, host: torch.Tensor) -> torch.cuda.Event:
        side = self._side
        side.wait_stream(torch.cuda.current_stream(self.device))  # the tensor may not be computed yet
        with torch.cuda.stream(side):
            host.copy_(_uint8_view(storage, self.device), non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return event

    def to_device(self, host: torch.Tensor) -> tuple[torch.UntypedStorage, torch.cuda.Event]:
        side = self._side
        # allocated on the compute stream, which uses it; the side stream first waits for the work queued
        # so far, which may still read whatever this memory held before
        dev = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        # a prefetched storage freed without being read (a branch the backward skips) must not be reused
        # by the compute stream before the copy into it has finished
        dev.record_stream(side)
        return dev.untyped_storage(), event

    def done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def bandwidth(self) -> float:
        """Device-to-host bandwidth into a pinned buffer, measured once (64 MiB, best of 3)."""
        if self._bandwidth is None:
            nbytes = 64 * 2**20
            src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            host = self.alloc_host(nbytes)
            try:
                best = float("inf")
                for _ in range(3):
                    torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                    host.copy_(src, non_blocking=True)
                    torch.cuda.synchronize(self.device)
                    best = min(best, time.perf_counter() - t0)
            finally:
                self.free_host(host)
            self._bandwidth = nbytes / best
        return self._bandwidth


class _SimEvent:
    """A stand-in CUDA event: complete once every copy queued before it has run."""

    def __init__(self, target: SimulatedTarget) -> None:
        self.target = target
        self.seq = target._issued
        self.polls = 0

    def complete(self) -> bool:
        return self.target._ran >= self.seq


class SimulatedTarget(Target):
    """CPU tensors as the "device", other CPU tensors as the "host", a queue as the side stream.

    ``copy_delay``: a copy runs only when an event is waited on (`synchronize`, `wait`) or after this many
    `done` polls of its event; 0 runs it at the first poll. ``bandwidth``: bytes per second reported to
    estimates (nothing is slowed down). Counters: ``host_allocs``, ``host_frees``, ``d2h``, ``h2d``
    (copies run), ``races`` (copies whose source storage had been freed: the engine let go too early,
    the first raises a RuntimeError; and host buffers freed while a queued copy still uses them, each
    raises);
    ``copies`` lists every copy run as (direction, host buffer address, device storage address).
    """

    simulated = True

    def __init__(self, copy_delay: int = 0, bandwidth: float = 25e9) -> None:
        if isinstance(copy_delay, bool) or not isinstance(copy_delay, int) or copy_delay < 0:
            raise ValueError(f"copy_delay must be a non-negative int, got {copy_delay!r}")
        self.device = torch.device("cpu")
        self.copy_delay = copy_delay
        self._bandwidth = float(bandwidth)
        self._queue: collections.deque[tuple[int, Any, tuple[int, ...]]] = collections.deque()
        self._issued = 0
        self._ran = 0
        self.host_allocs = 0
        self.host_frees = 0
        self.d2h = 0
        self.h2d = 0
        self.races = 0
        self.copies: list[tuple[str, int, int]] = []

    def accepts(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def alloc_host(self, nbytes: int) -> torch.Tensor:
        self.host_allocs += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def free_host(self, buf: torch.Tensor) -> None:
        self.host_frees += 1
        ptr = buf.data_ptr()
        if any(ptr in hosts for _, _, hosts in self._queue):
            # a copy into or out of this buffer has not run: freeing (unpinning) it now is a race
            self.races += 1
            raise RuntimeError("offload race: a host buffer was freed before a copy using it ran")

    def __getstate__(self) -> dict[str, Any]:  # the queue holds closures: the copy starts empty
        return {"copy_delay": self.copy_delay, "bandwidth": self._bandwidth}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["copy_delay"], state["bandwidth"])  # type: ignore[misc]

    def _enqueue(self, fn: Any, host: torch.Tensor) -> _SimEvent:
        self._issued += 1
        # the host buffer's address range start (a view into a pool buffer starts where the buffer does)
        self._queue.append((self._issued, fn, (host.data_ptr(),)))
        return _SimEvent(self)

    def _run_until(self, seq: int) -> None:
        while self._queue and self._queue[0][0] <= seq:
            n, fn, _ = self._queue.popleft()
            fn()
            self._ran = n

    def to_host(self, storage: torch.UntypedStorage, host: torch.Tensor) -> _SimEvent:
        source = weakref.ref(storage)  # NOTE [ No early free ]: only the engine keeps the source alive

        def copy() -> None:
            st = source()
            if st is None:
                self.races += 1
                if self.races > 1:  # raised once already; later ones only count
                    return
                raise RuntimeError(
                    "offload race: a device storage was freed before its copy to the host ran"
                )
            host.copy_(_uint8_view(st, self.device))
            self.d2h += 1
            self.copies.append(("d2h", host.data_ptr(), st.data_ptr()))

        return self._enqueue(copy, host)

    def to_device(self, host: torch.Tensor) -> tuple[torch.UntypedStorage, _SimEvent]:
        dev = torch.empty(host.numel(), dtype=torch.uint8)

        def copy() -> None:
            dev.copy_(host)
            self.h2d += 1
            self.copies.append(("h2d", host.data_ptr(), dev.data_ptr()))

        return dev.untyped_storage(), self._enqueue(copy, host)

    def done(self, event: _SimEvent) -> bool:
        if event.complete():
            return True
        event.polls += 1
        if event.polls > self.copy_delay:
            self._run_until(event.seq)
        return event.complete()

    def synchronize(self, event: _SimEvent) -> None:
        self._run_until(event.seq)

    def wait(self, event: _SimEvent) -> None:
        self._run_until(event.seq)  # the compute "stream" is the host thread: it must see the data

    def bandwidth(self) -> float:
        return self._bandwidth


def available(device: torch.device | str | None = None) -> bool:
    """Whether offloading saved tensors from `device` can lower its memory: True for a CUDA device of
    this process, False for the CPU (host and device memory are the same), meta and anything else."""
    if device is None:
        return torch.cuda.is_available()
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available()


def target_for(device: torch.device | str, pin: str = "register") -> Target | None:
    """The real target for `device` (a `CudaTarget`), or None where offloading cannot help."""
    if not available(device):
        return None
    return CudaTarget(device, pin=pin)
