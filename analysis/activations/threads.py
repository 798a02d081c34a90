"""The threads extraction overlaps with the forward pass, and when to use them."""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable

import torch


class Worker:
    """One thread running submitted tasks in order, behind a bounded queue (or, with
    `threaded=False`, the caller running each task as it is submitted).

    After the first error it skips the remaining tasks but keeps draining (so `submit` never
    blocks on a full queue) and `check`/`close` re-raise that error in the caller's thread.
    """

    def __init__(self, maxsize: int, *, threaded: bool = True):
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
            self.thread = threading.Thread(target=self._run, name="activation-worker", daemon=True)
            self.thread.start()

    def _run(self):
        with torch.inference_mode():  # as the caller's thread: no autograd state on these tensors
            while (task := self.queue.get()) is not None:
                if self.error is None:
                    try:
                        task()
                    except BaseException as e:  # handed to the caller, not swallowed
                        self.error = e

    def submit(self, task: Callable[[], None]) -> None:
        self.check()
        if self.thread is None:
            task()
        else:
            self.queue.put(task)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Finish the queued tasks and join the thread (idempotent); never raises."""
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def close(self) -> None:
        self.stop()
        self.check()


class CallerExecutor:
    """The submit/shutdown of a ThreadPoolExecutor, running each call at once on the caller."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # held by the future, raised by .result() like a thread's
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def spare_core(device: torch.device) -> bool:
    """Whether worker and writer threads would have a core the forward pass leaves free.

    With the forward on an accelerator, or on fewer CPU threads than cores, the worker's
    checks, statistics and cast, and the local file writes, run beside it. When torch's CPU
    threads already fill every core, extra threads only preempt them, and a preempted thread
    stalls the whole parallel op. Mouse ViT on 2 cores, extract images/s over a bare forward,
    both placements in the same run, median of 7 (benchmarks/results/extraction*.json): with 2
    torch threads, 0.706 with worker and writer threads vs 0.832 with all of it on the caller;
    with 1 torch thread, 0.953 with the threads vs 0.906 on the caller.
    """
    if device.type != "cpu":
        return True
    return torch.get_num_threads() < cpu_cores()


def cpu_cores() -> int:
    """Cores this process may run on (its affinity, where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def image_reads(device: torch.device) -> int:
    """Image block reads in flight while the forward runs.

    A read is mostly zstd decompression of one image chunk (`read_images`), which releases the
    GIL, so reads on several threads decompress on several cores: 2,048 stored 224 px photos read
    at 5,050 images/s one read at a time and 7,580 two at a time on 2 cores (Zarr's own reads:
    2,380 and 3,510; benchmarks/results/image_reads.json). On the CPU one read ahead hides the
    reads (ViT-S/16's forward ran at 10-18 images/s on these 2 cores; the mouse's extract ÷
    forward-only did not move with faster reads), and more would only take cores from the forward.
    On an accelerator one Zarr reader was the wall (an H200 forward of ViT-B/16 ran at 9,259
    images/s, the capture with its reads at 2,607), so reads go on a quarter of the cores, 2 to 4
    of them (a 64 MiB buffer each).
    """
    if device.type == "cpu":
        return 1
    return max(2, min(4, cpu_cores() // 4))
