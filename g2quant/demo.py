"""``g2quant demo``: the one-minute tour on an embedded default.

PTB when it is available locally (``$G2QUANT_DATA/ptb`` or the download cache; the demo never
downloads), else a corpus the package generates itself. Trains a small G2-LSTM language model
for about a minute, prints its perplexity with soft and hard gates, and writes the gate
histogram; then quantizes, exports and reloads the model in the torch-free CPU engine when
those stages are available.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def _pick_corpus(data: str, data_dir):
    from .data.download import DataError
    from .data.ptb import load_ptb
    from .data.synthetic import synthetic_corpus

    if data in ("auto", "ptb"):
        try:
            return "ptb", load_ptb(data_dir, download=False)
        except DataError as exc:
            if data == "ptb":
                raise
            print(f"PTB not available locally ({exc}); using the generated corpus")
    return "synthetic", synthetic_corpus()


def run_demo(out_dir="g2quant-demo", seconds: float = 60.0, data: str = "auto", data_dir=None,
             threads: int = 2) -> int:
    import torch

    from .evaluate import lm_perplexity
    from .models import LMConfig, WordLM
    from .defaults import RECOMMENDED_NOISE_P
    from .nn import GateRecorder
    from .train import TrainConfig, train_lm

    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, corpus = _pick_corpus(data, data_dir)
    valid = corpus.valid[:20_000]
    if name == "ptb":
        # train-lm's noise p; no dropout: a one-minute run is far from overfitting
        cfg = LMConfig.preset("small", vocab_size=len(corpus.vocab), gates="gumbel", noise_p=RECOMMENDED_NOISE_P)
        tcfg = TrainConfig(epochs=1, time_budget=seconds)
    else:
        cfg = LMConfig(vocab_size=len(corpus.vocab), emb_size=64, hidden_size=64, num_layers=2, gates="gumbel",
                       noise_p=RECOMMENDED_NOISE_P)
        tcfg = TrainConfig(epochs=50, lr=10.0, decay_after=50, time_budget=seconds)
    torch.manual_seed(0)
    model = WordLM(cfg)
    print(f"[1/3] training a {cfg.num_layers}x{cfg.hidden_size} G2-LSTM LM (Gumbel input/forget gates, "
          f"tau {cfg.effective_tau}) on {name} for ~{seconds:.0f}s")
    t0 = time.time()
    result = train_lm(model, corpus.train, valid, tcfg, out / "checkpoints", progress=True,
                      log=lambda s: print("      " + s))
    train_s = time.time() - t0

    print("[2/3] evaluating (valid, batch 10, bptt 35, state carried across batches)")
    report = {"data": name, "config": cfg.to_dict(), "train_seconds": train_s, "epochs": len(result.history)}
    with GateRecorder(model) as rec:
        report["valid_ppl"] = lm_perplexity(model, valid)["ppl"]
    model.rnn.hard_gates = frozenset("if")
    report["valid_ppl_hard_if"] = lm_perplexity(model, valid)["ppl"]
    model.rnn.hard_gates = frozenset()
    report["gate_saturation"] = rec.stats.summary()
    hist = out / "gates.png"
    rec.stats.plot(hist, title=f"G2-LSTM gate values on {name} valid")
    print(f"      perplexity {report['valid_ppl']:.2f} (soft gates), {report['valid_ppl_hard_if']:.2f} "
          f"(hard input/forget gates 1[a>0])")
    for key in ("l0.i", "l0.f"):
        s = report["gate_saturation"][key]
        print(f"      {key}: {s['below_0.1']:.0%} of values < 0.1, {s['above_0.9']:.0%} > 0.9")
    print(f"      gate histogram: {hist}")

    print("[3/3] quantize to 4 bits, export, reload in the torch-free CPU engine")
    _quantize_and_export(model, corpus, valid, out, report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"done: {out / 'report.json'}")
    return 0


def _quantize_and_export(model, corpus, valid, out: Path, report: dict) -> None:
    from .api import quantize
    from .targets.artifact import artifact_size
    from .targets.cpu.engine import Engine

    q = quantize(model, bits=4, hard_gates="if")
    t0 = time.time()
    torch_ppl = q.evaluate(valid)["ppl"]
    path = q.export(out / "model.g2q", vocab=corpus.vocab,
                    validation={"valid_ppl_quantized_torch": torch_ppl, "valid_ppl_float": report["valid_ppl"]})
    engine = Engine.load(path)
    rep = engine.perplexity(valid, batch_size=10, bptt=35)
    report["artifact"] = {"path": str(path), "bits": 4, "hard_gates": "if", "valid_ppl_torch": torch_ppl,
                          "valid_ppl_engine": rep.perplexity, "size_bytes_on_disk": artifact_size(path),
                          "size_bytes": q.size_bytes(), "float_size_bytes": q.float_size_bytes(),
                          "seconds": time.time() - t0}
    a = report["artifact"]
    print(f"      4-bit weights, int8 activations, hard input/forget gates -> {path}")
    print(f"      perplexity: float {report['valid_ppl']:.2f} | quantized (torch) {torch_ppl:.2f} | "
          f"artifact in the CPU engine {rep.perplexity:.2f}")
    print(f"      size: float {a['float_size_bytes'] / 1e6:.2f} MB -> artifact {a['size_bytes_on_disk'] / 1e6:.2f} MB "
          f"on disk ({a['float_size_bytes'] / a['size_bytes_on_disk']:.1f}x smaller)")
    print(f"      try: g2quant run {path} --prompt \"{' '.join(corpus.vocab[:2])}\"")
