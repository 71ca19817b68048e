"""gpu-fp16 artifacts (Triton) vs cuDNN on a CUDA device: 2-layer LSTM LMs, vocab 10k, random weights.

    python benchmarks/gpu.py                       # H 650 and 1500, 4-bit; needs CUDA
    python benchmarks/gpu.py --hidden 650 --bits 4 2

Measured side by side in one run: batch-1 streaming latency per token (state carried; the
artifact's step is one CUDA-graph replay) and batched throughput (20 x 35 and 64 x 35 tokens per
call), for the artifact and for cuDNN fp16 ``nn.LSTM`` called one step at a time and over whole
sequences and fp16 ``nn.LSTMCell``; achieved weight-streaming GB/s of the artifact against the
device's measured copy bandwidth. Writes ``benchmarks/results/gpu.json``. Exits with a clear
message (status 2) when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _sync_time(fn, n: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def copy_bandwidth_gb_s() -> float:
    import torch
    a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = _sync_time(lambda: b.copy_(a), 20)
    return 2 * a.numel() / t / 1e9            # read + write


def bench_artifact(path, H: int, vocab: int, steps: int) -> dict:
    import g2quant
    rt = g2quant.load(path, device="cuda")
    rng = np.random.default_rng(0)
    st = rt.initial_state(1)
    toks = rng.integers(0, vocab, steps)
    for t in toks[:20]:
        rt.step_(np.array([t]), st)
    t0 = time.perf_counter()
    for t in toks:
        rt.step_(np.array([t]), st)
    lat = (time.perf_counter() - t0) / steps
    out = {"ms_per_token_b1": lat * 1e3}
    for B in (20, 64):
        x = rng.integers(0, vocab, (35, B))
        rt.run(x)
        t0 = time.perf_counter()
        for _ in range(5):
            rt.run(x)
        out[f"tokens_per_s_{B}x35"] = 5 * 35 * B / (time.perf_counter() - t0)
    weight_bytes = sum(m.words.numel() * 4 + m.scale.numel() * 4 for m in rt._mats.values() if hasattr(m, "words"))
    out["weight_bytes_per_token_b1"] = weight_bytes
    out["weight_gb_s_b1"] = weight_bytes / lat / 1e9
    return out


def bench_cudnn(H: int, vocab: int, steps: int) -> dict:
    import torch
    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab, H).cuda().half()
    lstm = torch.nn.LSTM(H, H, 2).cuda().half()
    cells = [torch.nn.LSTMCell(H, H).cuda().half() for _ in range(2)]
    dec = torch.nn.Linear(H, vocab).cuda().half()
    toks = torch.randint(0, vocab, (steps, 1), device="cuda")
    out = {}
    with torch.no_grad():
        h = (torch.zeros(2, 1, H, device="cuda", dtype=torch.half),) * 2
        state = {"h": h, "i": 0}

        def step():
            state["i"] = (state["i"] + 1) % steps
            y, state["h"] = lstm(emb(toks[state["i"]:state["i"] + 1]), state["h"])
            dec(y)
        out["cudnn_step_ms_per_token_b1"] = _sync_time(step, steps) * 1e3
        hc = [(torch.zeros(1, H, device="cuda", dtype=torch.half),) * 2 for _ in range(2)]

        def cell_step():
            x = emb(toks[0])
            for k, cell in enumerate(cells):
                hc[k] = cell(x, hc[k])
                x = hc[k][0]
            dec(x)
        out["lstmcell_ms_per_token_b1"] = _sync_time(cell_step, steps) * 1e3
        for B in (20, 64):
            x = torch.randint(0, vocab, (35, B), device="cuda")
            out[f"cudnn_seq_tokens_per_s_{B}x35"] = 35 * B / _sync_time(lambda: dec(lstm(emb(x))[0]), 20)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[650, 1500])
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; this machine has none (the kernels are tested on CPU "
              "with TRITON_INTERPRET=1 in tests/test_gpu_target.py)", file=sys.stderr)
        return 2
    from g2quant.targets.cpu.testing import random_lm_weights
    from g2quant.targets.gpu_fp16.target import write
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for H in args.hidden:
            peer = bench_cudnn(H, args.vocab, args.steps)
            for b in args.bits:
                w = random_lm_weights(args.vocab, H, 2, b, seed=0)
                path = write(w.to_graph(), Path(tmp) / f"lm{H}-{b}.g2q")
                r = {"hidden": H, "bits": b, **bench_artifact(path, H, args.vocab, args.steps), **peer}
                r["vs_cudnn_step_b1"] = r["cudnn_step_ms_per_token_b1"] / r["ms_per_token_b1"]
                for B in (20, 64):
                    r[f"vs_cudnn_seq_{B}x35"] = r[f"tokens_per_s_{B}x35"] / r[f"cudnn_seq_tokens_per_s_{B}x35"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": copy_bandwidth_gb_s(),
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
