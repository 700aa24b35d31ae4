"""Peak memory of a training run on a CPU, two ways: the process's resident memory, and its live tensors.

Resident memory is what the machine pays, but it is noisy: glibc keeps freed heap blocks resident (how many depends
on its mmap threshold, see finetune/measure.py) and it counts libraries and interpreter objects. The live-tensor peak
is deterministic, the CPU's counterpart of torch.cuda.max_memory_allocated, and what two runs of the same job should
be compared on.
"""

from __future__ import annotations

import os
import threading


class RSSSampler:
    """Peak resident memory over a stretch of time, sampled from /proc every few milliseconds.

    `ru_maxrss` never goes down, so it also counts the model-loading peak; this measures only the span between
    start() and stop(), e.g. the training steps. Resident memory counts the freed blocks glibc keeps in its heap
    (every allocation below its mmap threshold); finetune/measure.py sets that threshold for timing runs and,
    lower, for runs checked against the plan.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._current())
            self._stop.wait(self.interval_s)

    def start(self) -> RSSSampler:
        self.peak_bytes = self._current()
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**30


class TensorPeak:
    """Peak bytes of live CPU tensors over a stretch of training: the CPU's counterpart of
    torch.cuda.max_memory_allocated, and deterministic where resident memory is not (it counts no freed heap blocks
    glibc keeps, no library code or interpreter objects).

    torch keeps no CPU allocator statistics, but its profiler with profile_memory records every allocation and free
    of the CPU allocator; their running sum from start() gives the peak above what was live then, to which start()
    adds the tensors then reachable from Python (weights, buffers, anything a trainer holds). The profiler slows the
    steps, so timing runs do not use it."""

    def start(self) -> TensorPeak:
        from torch.profiler import ProfilerActivity, profile

        self.live_bytes = live_tensor_bytes()
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def stop(self) -> float:
        self._profile.__exit__(None, None, None)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._profile.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        return (self.live_bytes + peak) / 2**30


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages behind every tensor reachable from Python (parameters, buffers,
    optimizer states, held batches)."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # broad: odd tensor subclasses (fake, functional) have no storage to count
            continue
    return sum(storages.values())
