"""Torch-free CPU engine for any ``cpu`` artifact (``NAME.g2q``).

    eng = Engine.load("model.g2q")
    y, state = eng.run(x)                    # x shaped like the torch model's input
    y_t, state = eng.step(x_t, state)        # streaming, one time step (unidirectional models)

Word-level language models (token ids in, per-step logits over the same vocabulary out) also get
``score``, ``perplexity``, ``generate``, ``encode`` / ``decode`` on top of ``run`` / ``step``.

Each node of the graph runs its CPU program (``programs``: Numba kernels on bit-packed weights,
specialized on first use for the artifact's widths and this CPU's inner loop, cached on disk) or,
for what the kernels do not cover (float matrices, float activations) and with
``backend="reference"``, its NumPy reference.

Concurrency: every call allocates its own scratch; the engine holds only read-only packed
weights, so one engine may serve several threads at once, each with its own state.

Threads: ``threads=n`` fixes the Numba thread count of every call; by default each kind of call
(streaming step or sequence, by batch size) uses whichever of 1 or all threads it measures faster
(``threads.py``): never much slower than one thread on a busy machine, parallel when idle.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifact import artifact_size
from ..graph import Graph
from ..lm import LMMixin, PerplexityReport
from ..reference import REFERENCE
from ..runtime import Runtime, State
from . import kernels, programs
from .target import check, read, size_bytes
from .threads import ThreadPolicy, timed

__all__ = ["Engine", "State", "PerplexityReport", "BACKENDS"]

log = logging.getLogger("g2quant.engine")
BACKENDS = ("auto", "kernels", "reference")
COMPILE_NOTICE_AFTER_S = 0.5


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get("G2QUANT_CPU_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "kernels" if backend == "auto" else backend


def _loop_arg():
    """The active inner loop as the kernels take it."""
    path = kernels.get_path()
    try:
        from .isa import loop_id
    except ImportError:
        return path == "vnni"
    return loop_id(path)


def numba_cache_dir() -> str:
    from numba.core.config import CACHE_DIR
    return CACHE_DIR or "__pycache__ next to the g2quant modules"


class Engine(LMMixin, Runtime):
    """Runs a lowered graph on the CPU; see the module docstring."""

    def __init__(self, graph: Graph, vocab: list[str] | None = None, manifest: dict | None = None, *, path=None,
                 backend: str = "auto", threads: int | None = None,
                 on_compile: Callable[[str], None] | None = None, warmup: bool = True):
        super().__init__(graph)
        check(graph)
        self.vocab = None if vocab is None else list(vocab)
        if self.vocab is not None and (self.input_kind != "tokens" or len(self.vocab) != self.input_size):
            raise ValueError(f"a vocabulary of {len(self.vocab)} words does not fit this model's input")
        self.manifest = dict(manifest or {})
        self.path = None if path is None else Path(path)
        self.backend = _resolve_backend(backend)
        self.threads = None if threads is None else _threads(threads)
        import numba
        self._policy = ThreadPolicy(numba.config.NUMBA_NUM_THREADS)
        self.loop = kernels.get_path() if self.backend == "kernels" else "numpy"
        self._ctx = programs.BuildContext(_loop_arg())
        t0 = time.perf_counter()
        self._fn_cache = [self._node_fn(n) for n in graph.nodes]
        self.prepare_seconds = time.perf_counter() - t0
        self.compile_seconds = self._warmup(on_compile) if warmup and self.backend == "kernels" else 0.0

    @classmethod
    def load(cls, path, *, backend: str = "auto", threads: int | None = None,
             on_compile: Callable[[str], None] | None = None, warmup: bool = True) -> "Engine":
        """Verify and load ``path`` (``NAME.g2q``), pack its weights for the kernels and compile (or
        load from the cache) the kernels it needs; ``on_compile(message)`` is called when that
        takes more than half a second (first use on this machine)."""
        graph, vocab, man = read(path)
        return cls(graph, vocab, man, path=path, backend=backend, threads=threads, on_compile=on_compile,
                   warmup=warmup)

    def _node_fn(self, node):
        if self.backend == "reference":
            return REFERENCE[node.op](self.graph, node)
        return programs.build(self.graph, node, self._ctx)

    def _warmup(self, on_compile) -> float:
        """One batch-1 step on a dummy input: compiles (or loads) every kernel this graph uses."""
        msg = f"compiling CPU kernels for {self.loop} (once; cached in {numba_cache_dir()})"
        done = threading.Event()

        def notice():
            if not done.wait(COMPILE_NOTICE_AFTER_S):
                log.debug(msg)
                if on_compile is not None:
                    on_compile(msg)
        timer = threading.Thread(target=notice, daemon=True)
        timer.start()
        t0 = time.perf_counter()
        try:
            x = np.zeros((1, 1), np.int64) if self.input_kind == "tokens" else np.zeros((1, 1, self.input_size),
                                                                                    np.float32)
            super()._execute(x, self.initial_state(1))
        finally:
            done.set()
            timer.join()
        return time.perf_counter() - t0

    def _execute(self, xs, state):
        if self.threads is not None:
            import numba
            numba.set_num_threads(self.threads)
            return super()._execute(xs, state)
        # automatic: the faster of 1 and all threads for this kind of call, measured (see threads.py)
        key = (xs.shape[0] == 1, xs.shape[1])
        return timed(self._policy, key, lambda: super(Engine, self)._execute(xs, state))

    @property
    def size_bytes(self) -> int:
        """Artifact size on disk (or the stored size of the parameters when not loaded from disk)."""
        if self.path is not None:
            return artifact_size(self.path)
        return size_bytes(self.graph.params)

    def info(self) -> dict:
        """Backend, inner loop, CPU features, threads, timings: what benchmarks record."""
        import numba
        return {"backend": self.backend, "loop": self.loop, "cpu_features": kernels.cpu_features(),
                "threads": self.threads if self.threads is not None else "auto",
                "max_threads": numba.config.NUMBA_NUM_THREADS, "threading_layer": _threading_layer(),
                "thread_choices": self._policy.summary(),
                "prepare_s": self.prepare_seconds, "compile_s": self.compile_seconds,
                "reference_nodes": [n.name for n, fn in zip(self.graph.nodes, self._fn_cache)
                                    if not getattr(fn, "on_kernels", False)]}

    def __repr__(self) -> str:
        return (f"Engine({self.input_kind}[{self.input_size}] -> {self.output_info.kind}[{self.output_info.features}], "
                f"{len(self.graph.nodes)} nodes, backend={self.backend!r}, loop={self.loop!r}, "
                f"path={str(self.path) if self.path else None!r})")


def _threads(n) -> int:
    import numba
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    limit = numba.config.NUMBA_NUM_THREADS
    if n > limit:
        raise ValueError(f"threads={n} exceeds the {limit} threads Numba was started with (set NUMBA_NUM_THREADS)")
    return int(n)


def _threading_layer() -> str:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel region has run yet
        return "not initialized"
