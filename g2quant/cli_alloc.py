"""``g2quant allocate`` / ``profile`` / ``targets``: hardware-aware bit allocation from the command line."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .cli_common import CLIError, load_corpus, say

EPILOGS = {
    "allocate": "examples:\n  g2quant allocate runs/g2-small/best.safetensors --budget 1.8MB --out runs/alloc\n"
                "  g2quant allocate runs/g2-small/best.safetensors --budget 150us --profile host --out runs/alloc-lat\n"
                "  g2quant finetune runs/g2-small/best.safetensors --allocation runs/alloc/allocation.json --out runs/qat",
    "profile": "example:\n  g2quant profile            # measure this machine once (cached)",
    "targets": "example:\n  g2quant targets",
}


def add_commands(add, c) -> None:
    a = add("allocate", cmd_allocate, "choose a width per weight matrix under a size or latency budget")
    a.epilog = EPILOGS["allocate"]
    a.add_argument("checkpoint", help="float word-LM checkpoint")
    a.add_argument("--budget", required=True, help="size (e.g. 1.8MB, 900KiB) or per-token latency (e.g. 150us)")
    a.add_argument("--target", choices=["cpu", "onnx", "gpu-fp16"], default="cpu", help="whose size rule counts")
    a.add_argument("--profile", default="host", help="latency budgets: a shipped profile name, a TOML file, or host")
    a.add_argument("--widths", default="8,4,3,2,ternary,binary", help="candidate widths")
    a.add_argument("--granularity", choices=["matrix", "gate"], default="matrix",
                   help="gate: also measure the LSTM gate blocks (analysis; artifacts carry one width per matrix)")
    a.add_argument("--calib-tokens", type=c._positive_int, default=10_000, help="validation tokens for sensitivities")
    a.add_argument("--hard-gates", type=c._gates_arg, default="if", help="gates evaluated as 1[a>0]")
    a.add_argument("--out", required=True, help="output folder (allocation.json, table.md, front.png)")
    a.add_argument("--no-measure", action="store_true", help="skip measuring the chosen model's test perplexity")
    a.add_argument("--data", choices=["ptb", "synthetic"], default=None, help="corpus (default: the checkpoint's)")
    a.add_argument("--data-dir", default=None, help="folder holding ptb.{train,valid,test}.txt")
    a.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    a.add_argument("--threads", type=c._positive_int, default=None, help="torch threads")

    p = add("profile", cmd_profile, "measure this machine's kernel latency per storage width (for latency budgets)")
    p.epilog = EPILOGS["profile"]
    p.add_argument("--out", default=None, help="also write the profile to this TOML file")
    p.add_argument("--threads", type=c._positive_int, default=1, help="engine threads")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")

    t = add("targets", cmd_targets, "list the deployment targets and the shipped kernel profiles")
    t.epilog = EPILOGS["targets"]
    t.add_argument("--json", action="store_true", help="print the targets and profiles as JSON")


def cmd_targets(args) -> int:
    from .profiles import shipped
    from .targets.base import BUILTIN, get_target
    targets = {}
    for name in sorted(BUILTIN):
        try:
            targets[name] = {"available": True, "description": get_target(name).description}
        except ImportError as exc:
            targets[name] = {"available": False, "description": f"unavailable: {exc}"}
    prof = shipped()
    if args.json:
        print(json.dumps({"targets": targets, "profiles": {k: str(v) for k, v in prof.items()}}, indent=2))
        return 0
    for name, t in targets.items():
        print(f"{name:10s} {t['description'] if t['available'] else '(' + t['description'] + ')'}")
    print("kernel profiles: " + (", ".join(prof) if prof else "none shipped") + "; `g2quant profile` measures this machine")
    return 0


def cmd_profile(args) -> int:
    from .profiles import _cache_dir, host_name, measure, save_profile
    prof = measure(threads=args.threads, progress=lambda s: say(args, s))
    path = save_profile(prof, _cache_dir() / f"{host_name()}.toml")
    if args.out:
        save_profile(prof, args.out)
    if args.json:
        print(json.dumps({"name": prof.name, "loop": prof.loop, "cpu": prof.cpu, "threads": prof.threads,
                          "fit": {str(k): v for k, v in prof.fit.items()}, "overhead_seconds": prof.overhead,
                          "stream": {str(k): v for k, v in prof.stream.items()}}, indent=2))
    else:
        print(f"profile {prof.name} ({prof.loop}, {prof.threads} thread): cached in {path}")
        print(f"  per token: {prof.overhead * 1e6:.1f} us beyond the products")
        for bw, (a, b) in sorted(prof.fit.items()):
            rates = ", ".join(f"{w / 2 ** 20:g} MB {1e-9 / v:.0f}" for w, v in prof.stream.get(bw, []))
            print(f"  {bw}-bit: {a * 1e6:.2f} us + {b * 1e12:.3f} ps per MAC in cache"
                  + (f"; streaming GB/s by working set: {rates}" if rates else ""))
    return 0


def cmd_allocate(args) -> int:
    from . import cli
    from .allocate import allocate, block_bytes, parse_budget, sensitivity
    from .api import _check_bits, quantize
    from .evaluate import lm_perplexity

    cli._set_torch_threads(args)
    model, record = cli._load_model(args.checkpoint)
    if record.get("kind") != "word_lm":
        raise CLIError(f"{args.checkpoint} is not a float word-LM checkpoint (kind {record.get('kind')!r})")
    try:
        kind, limit = parse_budget(args.budget)
        widths = [_check_bits(w, "--widths") for w in args.widths.split(",")]
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    corpus = load_corpus(args, args.data or record.get("data", "ptb"))
    cli._check_vocab_size(model, corpus, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = None
    if kind == "latency":
        from .profiles import load_profile
        try:
            profile = load_profile(args.profile, progress=lambda s: say(args, "profile: " + s))
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    say(args, f"measuring sensitivities ({args.granularity} blocks x {len(widths)} widths on {args.calib_tokens:,} "
              "validation tokens)")
    t0 = time.perf_counter()
    sens = sensitivity(model, corpus.valid[:args.calib_tokens], widths=widths, granularity=args.granularity,
                       hard_gates=args.hard_gates, progress=lambda i, n: say(args, f"  block {i}/{n}"))
    (out / "sensitivity.json").write_text(json.dumps(sens, indent=1))
    matrix_sens = sens if args.granularity == "matrix" else sensitivity(
        model, corpus.valid[:args.calib_tokens], widths=widths, granularity="matrix", hard_gates=args.hard_gates)
    try:
        a = allocate(model, sens=matrix_sens, budget=args.budget, target=args.target, latency_profile=profile)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    a.save(out / "allocation.json")
    q = quantize(model, bits=a.bits_map(), hard_gates=args.hard_gates)
    result = {"budget": args.budget, "kind": kind, "target": args.target, "widths": a.widths,
              "predicted": a.predicted, "size_bytes": q.size_bytes(target=args.target),
              "sensitivity_seconds": sens["seconds"], "solve_and_measure_seconds": time.perf_counter() - t0}
    if profile is not None and not args.no_measure:
        result.update(_measure_latency(q, profile, args, a.predicted.get("latency")))
    uniform = {}
    if not args.no_measure:
        say(args, "measuring test perplexity of the allocation and of uniform widths")
        result["test_ppl"] = lm_perplexity(q, corpus.test)["ppl"]
        for w in ("8", "4", "2"):
            qu = quantize(model, bits=int(w), hard_gates=args.hard_gates)
            uniform[w] = {"size_bytes": qu.size_bytes(target=args.target), "test_ppl": lm_perplexity(qu, corpus.test)["ppl"]}
        result["uniform"] = uniform
    (out / "result.json").write_text(json.dumps(result, indent=1))
    rows = ["| block | shape | width | bytes | Δloss at that width |", "|---|---|---|---|---|"]
    for b in matrix_sens["blocks"]:
        w = a.widths.get(b["name"], "float")
        rows.append(f"| {b['name']} | {b['rows'][1] - b['rows'][0]}x{b['cols']} | {w} | {block_bytes(b, w, args.target):,} | "
                    f"{matrix_sens['delta'][b['name']].get(w, 0.0):+.4f} |")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    _plot(a, uniform, result, out / "front.png")
    print(f"allocation -> {out}/allocation.json ({', '.join(f'{k.split(chr(46), 1)[-1]}={v}' for k, v in a.widths.items())})")
    print(f"  predicted {kind} {a.predicted[kind]:.6g}, summed Δloss {a.predicted['sensitivity']:.4f}"
          + (f"; test ppl {result['test_ppl']:.2f}" if "test_ppl" in result else "")
          + (f"; measured {result['measured_latency_s'] * 1e6:.0f} us per token" if "measured_latency_s" in result
             else ""))
    return 0


def _measure_latency(q, profile, args, predicted: float | None) -> dict:
    """The chosen model's batch-1 token latency on this machine's engine (profile's thread count),
    against the prediction."""
    import tempfile
    import warnings

    from .profiles import lm_token_seconds
    from .targets.cpu.engine import Engine
    say(args, f"measuring the allocation's token latency on the cpu engine ({profile.threads} thread)")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = q.export(Path(tmp) / "alloc.g2q", target="cpu")
        sec = lm_token_seconds(Engine.load(path, threads=profile.threads))
    out = {"measured_latency_s": sec, "latency_profile": profile.name, "latency_threads": profile.threads}
    if predicted:
        out["latency_predicted_over_measured"] = predicted / sec
    return out


def _plot(a, uniform: dict, result: dict, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.step(a.front["cost"], a.front["sensitivity"], where="post", label="mixed widths (predicted Δloss)")
    ax.axvline(a.budget["limit"], color="grey", ls="--", lw=0.8, label="budget")
    ax.set_xlabel("bytes" if a.budget["kind"] == "bytes" else "seconds per token")
    ax.set_ylabel("summed loss increase")
    if uniform and a.budget["kind"] == "bytes":
        ax2 = ax.twinx()
        xs = [v["size_bytes"] for v in uniform.values()]
        ax2.plot(xs, [v["test_ppl"] for v in uniform.values()], "o", color="C1", label="uniform widths (test ppl)")
        if "test_ppl" in result:
            ax2.plot([result["size_bytes"]], [result["test_ppl"]], "*", ms=12, color="C2", label="this allocation")
        ax2.set_ylabel("test perplexity")
        ax2.legend(loc="upper center", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
