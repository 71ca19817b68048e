"""Accuracy-vs-size trade-off reports: sweep bit widths × {PTQ, QAT} × gate mode for a
language model, write ``results.json`` (after every row, so nothing is lost if a run dies; a
rerun skips finished rows), a Markdown table and a PNG plot with the Pareto front."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


WIDTHS = (8, 6, 4, 3, 2, "ternary", "binary")
GATE_MODES = ("soft", "hard")      # hard: the gates the model trained to be binary (default_hard_gates)


def default_hard_gates(model) -> str:
    """The gates a "hard" row evaluates as ``1[a > 0]``: those the model trained as Gumbel gates
    (its config's ``gumbel_gates``), else the family's (LSTM i, f; GRU r, z)."""
    cfg = getattr(model, "config", None)
    gates = getattr(cfg, "gumbel_gates", None)
    if gates:
        return "".join(sorted(set(gates), key="ifrzo".index))
    return "rz" if getattr(cfg, "cell", "lstm") == "gru" else "if"


@dataclass(frozen=True)
class QATSettings:
    """Short quantization-aware fine-tuning from the float model (SGD, per-token mean loss)."""

    lr: float = 2.0
    max_batches: int = 400
    batch_size: int = 20
    bptt: int = 20
    clip: float = 0.25
    seed: int = 0


def _row_key(row) -> str:
    return f"{row['bits']}|{row['method']}|{row['gates']}"


def _eval(model, data, batch_size, bptt) -> float:
    from .evaluate import lm_perplexity
    return lm_perplexity(model, data, batch_size=batch_size, bptt=bptt)["ppl"]


def tradeoff(model, *, eval_data, train_data=None, valid_data=None, out_dir, name: str = "model",
             widths=WIDTHS, methods=("ptq", "qat"), gate_modes=("soft", "hard"),
             qat: QATSettings = QATSettings(), eval_batch_size: int = 10, eval_bptt: int = 35,
             progress: bool = True, log=print, hard_gates: str | None = None) -> list[dict]:
    """Run the sweep for one float LM; returns the rows (also in ``out_dir/results.json``).
    ``hard_gates``: the gates of the "hard" rows (default :func:`default_hard_gates`)."""
    from .api import quantize
    from .train import TrainConfig, train_lm

    bad = set(gate_modes) - set(GATE_MODES)
    if bad:
        raise ValueError(f"gate modes must be among {sorted(GATE_MODES)}, got {sorted(bad)}")
    if set(methods) - {"ptq", "qat"}:
        raise ValueError(f"methods must be among ['ptq', 'qat'], got {list(methods)}")
    if "qat" in methods and train_data is None:
        raise ValueError("QAT needs train_data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    rows = json.loads(res_path.read_text())["rows"] if res_path.exists() else []
    done = {_row_key(r) for r in rows}

    def save():
        tmp = res_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"model": name, "eval": {"batch_size": eval_batch_size, "bptt": eval_bptt},
                                   "qat": qat.__dict__, "rows": rows}, indent=1))
        tmp.replace(res_path)

    plan = [("float", "float", g) for g in gate_modes]
    plan += [(b, m, g) for m in methods for b in widths for g in gate_modes]
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc=f"tradeoff {name}")
    float_ppl = {r["gates"]: r["ppl"] for r in rows if r["method"] == "float"}
    for bits, method, gates in it:
        key = f"{bits}|{method}|{gates}"
        if key in done:
            continue
        t0 = time.time()
        hard = "" if gates == "soft" else (hard_gates or default_hard_gates(model))
        if method == "float":
            q = quantize(model, bits=16, act_bits=None, hard_gates=hard)
        elif method == "ptq":
            q = quantize(model, bits=bits, hard_gates=hard)
        else:
            q = quantize(model, bits=bits, method="qat", hard_gates=hard)
            tcfg = TrainConfig(epochs=1, lr=qat.lr, decay_after=1, batch_size=qat.batch_size, bptt=qat.bptt,
                               clip=qat.clip, seed=qat.seed, max_batches=qat.max_batches)
            train_lm(q, train_data, valid_data if valid_data is not None else eval_data[:5000], tcfg,
                     out / "qat" / f"{bits}-{gates}", progress=False, kind="quantized_word_lm",
                     record_extra={"config": model.config.to_dict(), "quant_config": q.config.to_dict()},
                     log=lambda s: None)
            q.eval()
        ppl = _eval(q, eval_data, eval_batch_size, eval_bptt)
        n_weights = sum(p.numel() for _, p, _ in q.weight_quantizers())
        row = {"bits": bits, "method": method, "gates": gates, "hard_gates": hard, "ppl": ppl,
               "size_bytes": q.size_bytes(), "float_size_bytes": q.float_size_bytes(),
               "bits_per_weight": 32.0 if method == "float" else _declared_bits(bits),
               "weights": n_weights, "seconds": time.time() - t0}
        if method == "float":
            float_ppl[gates] = ppl
        ref = float_ppl.get("soft")
        row["delta_ppl_pct"] = None if ref is None else 100.0 * (ppl / ref - 1.0)
        rows.append(row)
        save()
        log(f"{name}: {bits!s:>7} {method:5} {gates:4} ppl {ppl:8.2f}  {row['size_bytes'] / 1e6:6.2f} MB "
            f"({row['seconds']:.0f}s)")
    write_table(rows, out / "table.md", title=name)
    plot(rows, out / "tradeoff.png", title=name)
    return rows


def _declared_bits(bits) -> float:
    """Information bits per weight (ternary: log2(3)); storage is what size_bytes counts."""
    named = {"binary": 1.0, "ternary": 1.58}
    return named[bits] if bits in named else float(bits)


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (size, ppl): no other row is both smaller-or-equal and better."""
    pts = sorted(rows, key=lambda r: (r["size_bytes"], r["ppl"]))
    front, best = [], float("inf")
    for r in pts:
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def write_table(rows: list[dict], path, title: str = "") -> str:
    front = {id(r) for r in pareto_front(rows)}
    lines = [f"### {title}" if title else "",
             "| weights | method | gates | bits/weight | size (MB) | ppl | Δppl vs float | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = "" if r.get("delta_ppl_pct") is None else f"{r['delta_ppl_pct']:+.1f} %"
        lines.append(f"| {r['bits']} | {r['method']} | {r['gates']}{' (' + r['hard_gates'] + ')' if r['hard_gates'] else ''} "
                     f"| {r['bits_per_weight']:g} | {r['size_bytes'] / 1e6:.2f} | {r['ppl']:.2f} | {d} "
                     f"| {'★' if id(r) in front else ''} |")
    text = "\n".join(line for line in lines if line is not None) + "\n"
    Path(path).write_text(text)
    return text


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {("ptq", "soft"): ("o", "#7aa6d8"), ("ptq", "hard"): ("s", "#2f5f98"),
              ("qat", "soft"): ("^", "#f2a65a"), ("qat", "hard"): ("D", "#c0392b"),
              ("float", "soft"): ("*", "black"), ("float", "hard"): ("P", "gray")}
    for (method, gates), (marker, color) in styles.items():
        pts = [r for r in rows if r["method"] == method and r["gates"] == gates]
        if not pts:
            continue
        ax.scatter([r["size_bytes"] / 1e6 for r in pts], [r["ppl"] for r in pts], marker=marker, color=color,
                   label=f"{method} {gates} gates", s=60 if method == "float" else 36, zorder=3)
        for r in pts:
            if method != "float":
                ax.annotate(str(r["bits"])[:3], (r["size_bytes"] / 1e6, r["ppl"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    front = pareto_front(rows)
    ax.plot([r["size_bytes"] / 1e6 for r in front], [r["ppl"] for r in front], "--", color="green",
            lw=1, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("deployable size (MB, log scale)")
    ax.set_ylabel("perplexity")
    finite = [r["ppl"] for r in rows if r["ppl"] < 1e6]
    if finite:
        lo = min(finite)
        ax.set_ylim(lo * 0.97, min(max(finite) * 1.03, lo * 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
