"""What every runtime of a lowered graph shares: input checks, the torch-layout boundary, the
recurrent state, and the ``run`` / ``step`` API.

    y, state = rt.run(x)                 # x shaped like the torch model's input
    y, state = rt.run(x, state)          # continue from a state
    y_t, state = rt.step(x_t, state)     # one time step (unidirectional graphs)

A runtime subclass supplies one callable per node (``_node_fn``) taking time-major arrays:
``fn(inputs: list[array], states: dict[node name, tuple[array, ...]]) -> array``; recurrent nodes
read their entry of ``states`` and replace it with the final state.
"""
from __future__ import annotations

import numpy as np

from .graph import INPUT, Graph, get_op, validate


class State(tuple):
    """The recurrent state: one tuple of arrays per recurrent node, in graph order (for an LSTM
    ``(h, c)``, each ``[layers·directions, batch, hidden]`` like torch's ``(h_n, c_n)``).
    ``state.h`` / ``state.c`` name the arrays of a graph with exactly one LSTM."""

    def copy(self) -> "State":
        return State(tuple(a.copy() for a in s) for s in self)

    def _single(self, k: int) -> np.ndarray:
        if len(self) != 1:
            raise AttributeError("state.h / state.c need a graph with exactly one recurrent node; index the "
                                 "state by node instead")
        return self[0][k]

    @property
    def h(self) -> np.ndarray:
        return self._single(0)

    @property
    def c(self) -> np.ndarray:
        return self._single(1)

    @property
    def batch(self) -> int:
        return int(self[0][0].shape[1]) if self else 0


class Runtime:
    """Base class of graph runtimes (the NumPy reference, the CPU engine, ...)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.values = validate(graph)
        self.recurrent = graph.recurrent_nodes()
        self.streamable = graph.streamable
        self.input_kind = graph.input["kind"]
        self.input_size = graph.input["size"]
        self.batch_first = graph.input["layout"] == "bt"
        self.output_info = self.values[graph.output["value"]]
        self._shapes: dict[int, list] = {}

    def _state_shapes(self, batch: int) -> list:
        shapes = self._shapes.get(batch)
        if shapes is None:
            shapes = [get_op(n.op).state_shapes(n, batch) for n in self.recurrent]
            if len(self._shapes) < 64:
                self._shapes[batch] = shapes
        return shapes

    # ---- subclass hook -------------------------------------------------------------------
    def _node_fn(self, node):
        raise NotImplementedError

    # ---- state ---------------------------------------------------------------------------
    def initial_state(self, batch: int = 1) -> State:
        """The zero state for ``batch`` sequences."""
        batch = _positive(batch, "batch")
        return State(tuple(np.zeros(s, np.float32) for s in shapes) for shapes in self._state_shapes(batch))

    def check_state(self, state, batch: int) -> State:
        """``state`` as a State of the right shapes (a bare ``(h, c)`` is accepted for one LSTM)."""
        if state is None:
            return self.initial_state(batch)
        if len(self.recurrent) == 1 and isinstance(state, np.ndarray):
            state = ((state,),)                                   # a bare h (GRU)
        elif len(self.recurrent) == 1 and len(state) == 2 and isinstance(state[0], np.ndarray):
            state = (tuple(state),)                               # a bare (h, c) (LSTM)
        if not isinstance(state, tuple) or len(state) != len(self.recurrent):
            raise ValueError(f"state must hold one entry per recurrent node ({len(self.recurrent)}), as returned "
                             "by initial_state() or run()")
        out = []
        for node, entry, shapes in zip(self.recurrent, state, self._state_shapes(batch)):
            if not isinstance(entry, tuple) or len(entry) != len(shapes):
                raise ValueError(f"state of {node.name!r} must be a tuple of {len(shapes)} arrays")
            arrs = []
            for a, shp in zip(entry, shapes):
                if type(a) is np.ndarray and a.dtype == np.float32 and a.shape == shp and a.flags.c_contiguous \
                        and a.flags.writeable:
                    arrs.append(a)                              # the common case, cheaply
                    continue
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shp:
                    raise ValueError(f"state of {node.name!r} must be float32 arrays of shape {shp} (batch {batch}), "
                                     f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
                arrs.append(a if a.flags.c_contiguous and a.flags.writeable else np.ascontiguousarray(a).copy())
            out.append(tuple(arrs))
        return State(out)

    # ---- inputs --------------------------------------------------------------------------
    def _check_tokens(self, t: np.ndarray) -> np.ndarray:
        if t.size == 0:
            return t.astype(np.int64)
        if t.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {t.dtype}")
        if t.size == 1:
            lo = hi = int(t.reshape(-1)[0])
        else:
            lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.input_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, {self.input_size})")
        return t.astype(np.int64, copy=False)

    def _sequence_input(self, x) -> np.ndarray:
        """The input as time-major ``[T, B]`` ids or ``[T, B, F]`` float32 features."""
        x = np.asarray(x)
        if self.input_kind == "tokens":
            if x.ndim != 2:
                raise ValueError(f"run() expects token ids of shape {'[B, T]' if self.batch_first else '[T, B]'}, "
                                 f"got {x.shape}")
            x = self._check_tokens(x)
        else:
            if x.ndim != 3 or x.shape[2] != self.input_size:
                raise ValueError(f"run() expects features of shape "
                                 f"{'[B, T, ' if self.batch_first else '[T, B, '}{self.input_size}], got {x.shape}")
            if x.dtype.kind != "f":
                raise ValueError(f"features must be floating point, got dtype {x.dtype}")
            x = x.astype(np.float32, copy=False)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"empty input of shape {x.shape}")
        if self.batch_first:
            x = x.swapaxes(0, 1)
        return np.ascontiguousarray(x)

    def _step_input(self, x) -> np.ndarray:
        """One step's input ``[B]`` ids or ``[B, F]`` features as a ``[1, B, ...]`` sequence."""
        x = np.asarray(x)
        if self.input_kind == "tokens":
            if x.ndim == 0:
                x = x.reshape(1)
            if x.ndim != 1 or x.size == 0:
                raise ValueError(f"step() expects token ids of shape [B] (B >= 1), got {x.shape}")
            x = self._check_tokens(x)
        else:
            if x.ndim == 1:
                x = x[None]
            if x.ndim != 2 or x.shape[1] != self.input_size or x.shape[0] == 0:
                raise ValueError(f"step() expects features of shape [B, {self.input_size}], got {x.shape}")
            if x.dtype.kind != "f":
                raise ValueError(f"features must be floating point, got dtype {x.dtype}")
            x = x.astype(np.float32, copy=False)
        return np.ascontiguousarray(x[None])

    # ---- execution -----------------------------------------------------------------------
    def _execute(self, xs: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        env = {INPUT: xs}
        states = {n.name: s for n, s in zip(self.recurrent, state)}
        fns = self._fns()
        for node, fn in zip(self.graph.nodes, fns):
            env[node.name] = fn([env[i] for i in node.inputs], states)
        return env[self.graph.output["value"]], State(states[n.name] for n in self.recurrent)

    def _fns(self):
        fns = getattr(self, "_fn_cache", None)
        if fns is None:
            fns = self._fn_cache = [self._node_fn(n) for n in self.graph.nodes]
        return fns

    def _present(self, y: np.ndarray) -> np.ndarray:
        """From the time-major internal layout to the torch model's output layout."""
        layout = self.graph.output["layout"]
        if layout == "tb" or layout == "b":
            return y
        if layout == "bt":
            return np.ascontiguousarray(y.swapaxes(0, 1))
        if layout == "flat_tb":
            return y.reshape(-1, y.shape[-1])
        return np.ascontiguousarray(y.swapaxes(0, 1)).reshape(-1, y.shape[-1])

    def run(self, x, state=None) -> tuple[np.ndarray, State]:
        """Whole sequences. ``x`` is shaped like the torch model's input (its own ``batch_first``);
        returns the model's (first) output and the final state. ``state`` is not modified."""
        xs = self._sequence_input(x)
        st = self.check_state(state, xs.shape[1]).copy()
        y, st = self._execute(xs, st)
        return self._present(y), st

    def step(self, x_t, state=None) -> tuple[np.ndarray, State]:
        """One time step: ``x_t`` is ``[B]`` ids or ``[B, F]`` features; returns this step's output
        (``[B, F]``) and the new state. The given ``state`` is not modified."""
        xs = self._step_input(x_t)
        return self._step(xs, self.check_state(state, xs.shape[1]).copy())

    def step_(self, x_t, state: State) -> np.ndarray:
        """In place: advance ``state`` (a State from ``initial_state``/``run``) by one step."""
        xs = self._step_input(x_t)
        st = self.check_state(state, xs.shape[1])
        if any(a is not b for s_new, s_old in zip(st, state) for a, b in zip(s_new, s_old)):
            raise ValueError("step_() needs a C-contiguous, writeable State as returned by initial_state()")
        y, new = self._step_raw(xs, st)
        for s_old, s_new in zip(state, new):
            for a, b in zip(s_old, s_new):
                if a is not b:
                    a[...] = b
        return y

    def _step(self, xs, st):
        y, st = self._step_raw(xs, st)
        return y, st

    def _step_raw(self, xs, st):
        if not self.streamable:
            raise ValueError("this model has a bidirectional layer: it runs whole sequences only (use run())")
        y, st = self._execute(xs, st)
        return (y[0] if self.output_info.kind == "seq" else y), st


def _positive(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)
