"""The grader's worker pool: each item graded in a worker process under a wall-clock limit; a
hung worker is killed and replaced (pebble's ProcessPool).
Infrastructure only (the science is in the experiments, common.py and the worlds: what counts as
a correct answer is `math_world.verify_answer`)."""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout

_POOL = None  # reused across calls: a worker's start-up (imports, warm-up) is paid once
_POOL_KEY = None
_LOCK = threading.Lock()  # one batch at a time drives the pool


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


def _start_worker(warm_up) -> None:
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its "timeout disabled" notes
    warm_up()  # imports and regex compilation, before any item's clock starts


def shutdown() -> None:
    global _POOL, _POOL_KEY
    if _POOL is not None and _POOL_KEY[0] == os.getpid():  # never a parent's pool from a fork
        _POOL.stop()
        _POOL.join()
    _POOL, _POOL_KEY = None, None


atexit.register(shutdown)


def _run_chunk(fn, jobs: list[tuple]) -> list[tuple]:
    return [fn(*job) for job in jobs]


def _result(future) -> tuple:
    """A single item's (ok, status): its worker's answer, or why there is none."""
    from pebble import ProcessExpired

    try:
        return future.result()
    except FutureTimeout:
        return False, "timeout"
    except ProcessExpired as e:  # segfault, OOM killer
        return False, f"error: worker process died ({e})"
    except Exception as e:  # noqa: BLE001 -- counted by the caller, never silent
        return False, f"error: {type(e).__name__}: {str(e)[:200]}"


def run(
    fn, jobs: list[tuple], timeout_s: float, workers: int, warm_up, preload: list[str]
) -> list[tuple]:
    """[fn(*job) for job in jobs] in worker processes, each job under `timeout_s` seconds of wall
    clock from when a worker picks it up. fn returns (ok, status); a job over time is
    (False, "timeout"), a worker that died or raised (False, "error: ...")."""
    global _POOL, _POOL_KEY
    from pebble import ProcessPool

    with _LOCK:
        key = (os.getpid(), workers, fn, warm_up)
        if _POOL_KEY != key:
            shutdown()
            # forkserver: workers fork from a clean server that preloaded the grader, so a killed
            # worker is replaced in milliseconds and none inherits torch's threads.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(preload)
            _POOL = ProcessPool(
                max_workers=workers, initializer=_start_worker, initargs=(warm_up,), context=ctx
            )
            _POOL_KEY = key
        try:
            # Chunks of items per task (one task per item costs ~30 % of the throughput); a chunk
            # has the sum of its items' limits, and a chunk over it is re-run item by item, so an
            # item is "timeout" only when it alone takes more than timeout_s.
            size = max(1, min(32, -(-len(jobs) // (4 * workers))))
            chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
            futures = [
                _POOL.schedule(fn, args=c[0], timeout=timeout_s)
                if len(c) == 1
                else _POOL.schedule(_run_chunk, args=(fn, c), timeout=timeout_s * len(c))
                for c in chunks
            ]
            out = []
            for chunk, future in zip(chunks, futures):
                if len(chunk) == 1:
                    out.append(_result(future))
                    continue
                try:
                    out += future.result()
                except Exception:  # noqa: BLE001 -- over time or died: each item again, alone
                    alone = [_POOL.schedule(fn, args=job, timeout=timeout_s) for job in chunk]
                    out += [_result(f) for f in alone]
            return out
        except BaseException:  # Ctrl-C mid-batch leaves workers busy: start clean next time
            shutdown()
            raise
