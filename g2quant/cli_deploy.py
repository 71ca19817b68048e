"""The torch-free subcommands of ``g2quant`` (artifacts and the CPU engine): ``run``, ``bench``,
``info``, and the artifact half of ``eval``. Nothing here imports torch, so they work with the
runtime-only install (``pip install g2quant``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .cli_common import CLIError, say


def is_artifact(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "manifest.json").exists()


def load_engine(args):
    """The artifact's runtime with the CLI's backend/threads, printing the compile notice."""
    from .targets.artifact import ArtifactError
    from .targets.base import load

    options = {"threads": args.threads, "on_compile": lambda msg: say(args, msg)}
    if getattr(args, "backend", "auto") != "auto":
        options["backend"] = args.backend
    try:
        return load(args.artifact, **options)
    except ArtifactError as exc:
        raise CLIError(f"cannot load {args.artifact}: {exc}") from None


def _read_ids(text: str) -> np.ndarray:
    try:
        return np.asarray([int(t) for t in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise CLIError(f"--ids must be whitespace- or comma-separated integers, got {text!r}") from None


def cmd_run(args) -> int:
    """Generate with a language model (``--prompt`` / ``--ids``) or run any model on ``--input X.npy``."""
    eng = load_engine(args)
    if args.input is not None:
        try:
            x = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--input {args.input}: cannot read a .npy array ({exc})") from None
        try:
            y, _ = eng.run(x)
        except ValueError as exc:
            raise CLIError(f"--input {args.input}: {exc}") from None
        if args.output:
            np.save(args.output, y)
            say(args, f"wrote {args.output}: output {y.dtype} {list(y.shape)}")
        if args.json or not args.output:
            print(json.dumps({"shape": list(y.shape), "output": y.tolist()}) if args.json else y)
        return 0
    if not eng.is_lm:
        raise CLIError(f"{args.artifact} is not a language model; run it on an input array with --input X.npy")
    if args.ids is not None:
        ids = _read_ids(args.ids)
    else:
        if eng.vocab is None:
            raise CLIError(f"{args.artifact} has no vocabulary; give the prompt as token ids with --ids")
        unknown = eng.unknown_words(args.prompt)
        try:
            ids = eng.encode(args.prompt)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        if unknown:
            print(f"note: {len(unknown)} prompt word(s) not in the vocabulary were mapped to <unk>: "
                  f"{' '.join(unknown[:10])}", file=sys.stderr)
    try:
        out = eng.generate(ids, args.max_tokens, temperature=args.temperature, seed=args.seed, top_k=args.top_k)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps({"prompt_ids": ids.tolist(), "ids": out.tolist(),
                          "text": eng.decode(out) if eng.vocab is not None else None}))
    elif eng.vocab is not None:
        print(" ".join(x for x in (eng.decode(ids), eng.decode(out)) if x))
    else:
        print(" ".join(str(int(i)) for i in np.concatenate([ids, out])))
    return 0


def eval_artifact(args, ids_for) -> int:
    """Perplexity of an LM artifact; ``ids_for(vocab) -> (ids, description)`` supplies the data."""
    eng = load_engine(args)
    if not eng.is_lm:
        raise CLIError(f"{args.artifact} is not a language model (perplexity needs token ids in and per-step "
                       "logits out)")
    ids, what = ids_for(eng.vocab, eng.input_size)
    if args.limit is not None:
        ids = ids[: args.limit]
    say(args, f"evaluating {args.artifact} on {what} ({ids.size:,} tokens)")
    try:
        rep = eng.perplexity(ids, batch_size=args.batch_size, bptt=args.bptt)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    result = {"model": str(args.artifact), "data": what, "perplexity": rep.perplexity, "nll": rep.nll,
              "tokens": rep.tokens, "batch_size": rep.batch_size, "bptt": rep.bptt,
              "state": "carried across batches", "seconds": rep.seconds, **eng.info()}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{what}: perplexity {rep.perplexity:.2f} over {rep.tokens} tokens (batch size {rep.batch_size}, "
              f"bptt {rep.bptt}, state carried across batches; {rep.seconds:.1f} s, {eng.backend} backend, "
              f"{eng.loop} loop)")
    return 0


def cmd_bench(args) -> int:
    """Latency of streaming steps and throughput of whole sequences on random inputs."""
    t0 = time.perf_counter()
    eng = load_engine(args)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.steps

    def sample(shape):
        if eng.input_kind == "tokens":
            return rng.integers(0, eng.input_size, size=shape).astype(np.int64)
        return rng.standard_normal(shape + (eng.input_size,)).astype(np.float32)

    result = {"artifact": str(args.artifact), "batch_size": B, "steps": T, "load_s": load_s, **eng.info(),
              "size_bytes": eng.size_bytes}
    if eng.streamable:
        xs = sample((T, B))
        st = eng.initial_state(B)
        for t in xs[: min(10, T)]:
            eng.step_(t, st)
        best = float("inf")
        for _ in range(args.repeats):
            t1 = time.perf_counter()
            for t in xs:
                eng.step_(t, st)
            best = min(best, time.perf_counter() - t1)
        result.update(ms_per_step=best / T * 1e3, ms_per_token=best / T / B * 1e3, step_tokens_per_s=T * B / best)
    seq = sample((args.seq_len, B)) if not eng.batch_first else np.swapaxes(sample((args.seq_len, B)), 0, 1)
    eng.run(seq)
    best = float("inf")
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        eng.run(seq)
        best = min(best, time.perf_counter() - t1)
    result.update(run_seq_len=args.seq_len, run_tokens_per_s=args.seq_len * B / best)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"{args.artifact}: {eng!r}")
    print(f"  backend {result['backend']}, loop {result['loop']}, threads {result['threads']} "
          f"({result['threading_layer']}), compile/load {result['compile_s']:.2f} s")
    if "ms_per_step" in result:
        print(f"  step, batch {B}: {result['ms_per_step']:.3f} ms/step, {result['ms_per_token']:.4f} ms/token "
              f"(best of {args.repeats} x {T} steps)")
    print(f"  run, {args.seq_len} steps x batch {B}: {result['run_tokens_per_s']:,.0f} tokens/s")
    print(f"  size {result['size_bytes'] / 1e6:.3f} MB, load {load_s:.2f} s")
    return 0


def cmd_info(args) -> int:
    """What an artifact holds: target, format, graph, sizes, validation figures."""
    from .targets.artifact import ArtifactError, artifact_size, read_manifest

    try:
        man = read_manifest(args.artifact)
    except ArtifactError as exc:
        raise CLIError(f"cannot read {args.artifact}: {exc}") from None
    if args.json:
        print(json.dumps({k: v for k, v in man.items() if k not in ("files",)}, indent=2))
        return 0
    print(f"{args.artifact}: target {man.get('target')!r}, format {man.get('format')} v{man.get('format_version')}, "
          f"written by g2quant {man.get('g2quant_version')}, {artifact_size(args.artifact) / 1e6:.3f} MB on disk")
    g = man.get("graph")
    if isinstance(g, dict):
        inp = g.get("input", {})
        print(f"  input: {inp.get('kind')} (size {inp.get('size')}, layout {inp.get('layout')})")
        for n in g.get("nodes", []):
            attrs = ", ".join(f"{k}={v}" for k, v in n.get("attrs", {}).items())
            print(f"  {n.get('name')}: {n.get('op')}({', '.join(n.get('inputs', []))}) {attrs}")
        print(f"  output: {g.get('output')}")
    elif isinstance(man.get("model"), dict):
        print(f"  model (format 1): {man['model']}")
    for k, v in (man.get("validation") or {}).items():
        print(f"  validation {k}: {v}")
    return 0
