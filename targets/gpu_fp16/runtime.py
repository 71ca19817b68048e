"""``GpuRuntime``: a gpu-fp16 artifact on a torch device through the Triton kernels, with the
``run`` / ``step`` API of every runtime (NumPy in, NumPy out).

- ``run``: per LSTM layer-direction one ``qlinear`` for the input projections of all steps, then
  one fused ``lstm_step`` launch per time step; linear heads are one ``qlinear`` over all positions.
- ``step`` on CUDA: the whole step (every node) is captured once per batch size in a
  ``torch.cuda.CUDAGraph`` with static input and state buffers, so one token is one replay plus two
  copies; with ``cuda_graphs=False`` or on CPU (the Triton interpreter) the kernels are launched.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops import lstm_dims, lstm_param_names
from ..qweights import QMatrix
from ..lm import LMMixin
from ..runtime import Runtime, State
from . import kernels as K
from .target import storage_width


def _gmatrix(m: QMatrix, device) -> K.GMatrix | torch.Tensor:
    bw = storage_width(m.bits, m.scheme)
    if bw == 32:
        return torch.as_tensor(m.q, device=device)
    return K.GMatrix(torch.as_tensor(K.pack_words(m.q, bw), device=device),
                     torch.as_tensor(m.scale, dtype=torch.float32, device=device), m.shape[0], m.shape[1], bw)


def _linear_t(w, x2: torch.Tensor, bias):
    if isinstance(w, K.GMatrix):
        return K.qlinear(w, x2, bias)
    y = (x2.half() @ w.half().t()).float()                    # a float matrix: fp16 product, fp32 out
    return y if bias is None else y + bias


class GpuRuntime(LMMixin, Runtime):
    backend = "triton"

    def __init__(self, graph, vocab=None, manifest=None, *, path=None, device: str = "cuda", cuda_graphs: bool = True):
        super().__init__(graph)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device (use device='cpu' with TRITON_INTERPRET=1 "
                               "to run the kernels in Triton's interpreter)")
        self.vocab, self.manifest, self.path = vocab, dict(manifest or {}), path
        self.loop = f"triton-{self.device.type}"
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._mats: dict[int, object] = {}
        self._fns = [self._build(n) for n in graph.nodes]
        self._graphs: dict[int, tuple] = {}

    # ---- programs -----------------------------------------------------------------------
    def _mat(self, m: QMatrix):
        if id(m) not in self._mats:
            self._mats[id(m)] = _gmatrix(m, self.device)
        return self._mats[id(m)]

    def _vec(self, a):
        return torch.as_tensor(np.asarray(a, np.float32), device=self.device)

    def _build(self, node):
        g, op = self.graph, node.op
        if op == "embedding":
            w = self._mat(g.param(node, "weight"))

            def fn(ins, st):
                toks = ins[0]
                if isinstance(w, K.GMatrix):
                    return K.embed(w, toks).reshape(*toks.shape, w.cols)
                return w[toks]
            return fn
        if op == "linear":
            w = self._mat(g.param(node, "weight"))
            b = self._vec(g.param(node, "bias")) if "bias" in node.params else None

            def fn(ins, st):
                x = ins[0]
                y = _linear_t(w, x.reshape(-1, x.shape[-1]).contiguous(), b)
                return y.reshape(*x.shape[:-1], y.shape[-1])
            return fn
        if op == "activation":
            f = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "log_softmax": lambda x: torch.log_softmax(x, -1), "softmax": lambda x: torch.softmax(x, -1)}
            act = f[node.attrs["fn"]]
            return lambda ins, st: act(ins[0])
        if op == "select_step":
            i = node.attrs["index"]
            return lambda ins, st: ins[0][i].contiguous()
        if op == "state_select":
            k, i, src = (0 if node.attrs["state"] == "h" else 1), node.attrs["index"], node.inputs[0]
            return lambda ins, st: st[src][k][i].clone()
        if op == "concat":
            return lambda ins, st: torch.cat(ins, dim=-1)
        if op == "lstm":
            return self._lstm(node)
        if op == "gru":
            return self._gru(node)
        raise NotImplementedError(f"gpu-fp16 has no program for op {op!r}")

    def _lstm(self, node):
        H, L, D = lstm_dims(node)
        hard = node.attrs.get("hard_gates", "")
        layers = [(self._mat(self.graph.param(node, ih)), self._mat(self.graph.param(node, hh)),
                   self._vec(self.graph.param(node, b))) for ih, hh, b in lstm_param_names(L, D)]

        def fn(ins, st):
            x = ins[0]
            h0, c0 = st[node.name]
            T, B = x.shape[0], x.shape[1]
            h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
            for layer in range(L):
                out = torch.empty((T, B, D * H), dtype=torch.float32, device=x.device)
                for d in range(D):
                    k = layer * D + d
                    w_ih, w_hh, bias = layers[k]
                    h, c = h0[k].contiguous(), c0[k].contiguous()
                    h2, c2 = torch.empty_like(h), torch.empty_like(c)
                    view = out[..., d * H:(d + 1) * H]
                    if T == 1:
                        K.lstm_step(w_ih, w_hh, bias, h, c, h2, c2, view[0], hard, x=x[0].contiguous())
                        h, c = h2, c2
                    else:
                        zx = K.qlinear(w_ih, x.reshape(T * B, -1)).reshape(T, B, 4 * H)
                        for s in range(T):
                            t = T - 1 - s if d == 1 else s
                            K.lstm_step(w_ih, w_hh, bias, h, c, h2, c2, view[t], hard, zx=zx[t])
                            h, c, h2, c2 = h2, c2, h, c
                    h_n[k], c_n[k] = h, c
                x = out
            st[node.name] = (h_n, c_n)
            return x
        return fn

    def _gru(self, node):
        from ..gru import gru_dims, gru_param_names
        H, L, D = gru_dims(node)
        hard = node.attrs.get("hard_gates", "")
        layers = [(self._mat(self.graph.param(node, ih)), self._mat(self.graph.param(node, hh)),
                   self._vec(self.graph.param(node, bi)), self._vec(self.graph.param(node, bh)))
                  for ih, hh, bi, bh in gru_param_names(L, D)]

        def fn(ins, st):
            x = ins[0]
            (h0,) = st[node.name]
            T, B = x.shape[0], x.shape[1]
            h_n = torch.empty_like(h0)
            for layer in range(L):
                out = torch.empty((T, B, D * H), dtype=torch.float32, device=x.device)
                for d in range(D):
                    k = layer * D + d
                    w_ih, w_hh, b_ih, b_hh = layers[k]
                    h = h0[k].contiguous()
                    h2 = torch.empty_like(h)
                    view = out[..., d * H:(d + 1) * H]
                    if T == 1:
                        K.gru_step(w_ih, w_hh, b_ih, b_hh, h, h2, view[0], hard, x=x[0].contiguous())
                        h = h2
                    else:
                        gx = K.qlinear(w_ih, x.reshape(T * B, -1), b_ih).reshape(T, B, 3 * H)
                        for s in range(T):
                            t = T - 1 - s if d == 1 else s
                            K.gru_step(w_ih, w_hh, b_ih, b_hh, h, h2, view[t], hard, gx=gx[t])
                            h, h2 = h2, h
                    h_n[k] = h
                x = out
            st[node.name] = (h_n,)
            return x
        return fn

    # ---- execution ------------------------------------------------------------------------
    def _run_torch(self, xs: torch.Tensor, states: dict) -> torch.Tensor:
        env = {"input": xs}
        for node, fn in zip(self.graph.nodes, self._fns):
            env[node.name] = fn([env[i] for i in node.inputs], states)
        return env[self.graph.output["value"]]

    def _execute(self, xs, state):
        if self.cuda_graphs and xs.shape[0] == 1:
            return self._replay(xs, state)
        with torch.no_grad():
            x = torch.as_tensor(xs, device=self.device)
            st = {n.name: tuple(torch.as_tensor(a, device=self.device) for a in s)
                  for n, s in zip(self.recurrent, state)}
            y = self._run_torch(x, st)
            return y.cpu().numpy(), State(tuple(a.cpu().numpy() for a in st[n.name]) for n in self.recurrent)

    def _replay(self, xs, state):
        """One streaming step through a CUDA graph captured for this batch size."""
        B = xs.shape[1]
        if B not in self._graphs:
            x_buf = torch.as_tensor(xs, device=self.device).clone()
            st_in = {n.name: tuple(torch.as_tensor(a, device=self.device).clone() for a in s)
                     for n, s in zip(self.recurrent, state)}
            with torch.no_grad():
                for _ in range(2):                               # warm up (Triton compiles) outside capture
                    self._run_torch(x_buf, dict(st_in))
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                st_work = dict(st_in)
                with torch.cuda.graph(g):
                    y = self._run_torch(x_buf, st_work)
            self._graphs[B] = (g, x_buf, st_in, st_work, y)
        g, x_buf, st_in, st_work, y = self._graphs[B]
        x_buf.copy_(torch.as_tensor(xs))
        for n, s in zip(self.recurrent, state):
            for dst, src in zip(st_in[n.name], s):
                dst.copy_(torch.as_tensor(src))
        g.replay()
        return y.cpu().numpy(), State(tuple(a.cpu().numpy() for a in st_work[n.name]) for n in self.recurrent)

    def info(self) -> dict:
        return {"backend": self.backend, "loop": self.loop, "device": str(self.device), "cuda_graphs": self.cuda_graphs}
