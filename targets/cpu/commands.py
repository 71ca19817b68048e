"""``g2quant run / eval / bench`` for CPU artifacts (torch-free).

``add_subcommands(subparsers)`` registers the three commands on an ``argparse``
sub-parser set; each sets ``func`` to its ``cmd_xxx(args) -> int`` (0 on success, 2 on a
clear user-facing error printed to stderr: missing or corrupt artifact, unknown words with
no ``<unk>``, bad options).

    g2quant run model.g2q --prompt "the company said" --max-tokens 20 [--temperature 0.8 --seed 1]
    g2quant eval model.g2q --data ptb [--data-dir DIR --split test --batch-size 20 --bptt 35]
    g2quant bench model.g2q [--batch 1 --tokens 200 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

BACKENDS = ("auto", "kernels", "reference")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="path to a NAME.g2q artifact directory (target 'cpu')")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels (Numba), reference (NumPy) or auto (kernels when available)")
    p.add_argument("--threads", type=int, default=None, help="number of Numba threads")


def add_subcommands(subparsers) -> None:
    """Register ``run``, ``eval`` and ``bench`` on an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser("run", help="generate text with a CPU artifact (word-level LM)",
                              description="Continue a prompt with a word-level LM artifact.")
    _common(p)
    p.add_argument("--prompt", default="", help="whitespace-separated words (unknown words become <unk>)")
    p.add_argument("--max-tokens", type=int, default=20, help="number of words to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, > 0 = sample")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely words")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("eval", help="perplexity of a CPU artifact on a data set",
                              description="Perplexity with the state carried across the stream.")
    _common(p)
    p.add_argument("--data", choices=("ptb",), default="ptb", help="data set")
    p.add_argument("--data-dir", default=None, help="folder with ptb.{train,valid,test}.txt "
                   "(default: $G2QUANT_DATA/ptb, then the download cache)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N tokens of the split")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("bench", help="per-token latency and throughput of a CPU artifact",
                              description="Time lm_step on random tokens (after a warm-up).")
    _common(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=200, help="time steps to time")
    p.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)


class _UserError(Exception):
    pass


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise _UserError(f"--threads must be >= 1, got {n}")
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if n > limit:
        raise _UserError(f"--threads {n} exceeds the {limit} threads Numba was started with "
                         "(set NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)


def _load(args):
    from ..artifact import ArtifactError
    from .engine import Engine

    _set_threads(args.threads)
    try:
        return Engine.load(args.artifact, backend=args.backend)
    except ArtifactError as exc:
        raise _UserError(f"cannot load {args.artifact}: {exc}") from exc
    except ModuleNotFoundError as exc:       # --backend kernels without the kernels module
        raise _UserError(f"backend {args.backend!r} is not available: {exc}") from exc


def _guard(name: str, fn, args) -> int:
    try:
        return fn(args)
    except _UserError as exc:
        print(f"g2quant {name}: error: {exc}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    """Generate ``--max-tokens`` words after ``--prompt`` and print prompt + continuation."""
    def body(args):
        eng = _load(args)
        if args.max_tokens < 0:
            raise _UserError("--max-tokens must be >= 0")
        if args.temperature < 0:
            raise _UserError("--temperature must be >= 0")
        unknown = eng.unknown_words(args.prompt)
        try:
            ids = eng.encode(args.prompt)
        except ValueError as exc:
            raise _UserError(str(exc)) from exc
        if unknown:
            print(f"note: {len(unknown)} prompt word(s) not in the vocabulary were mapped to <unk>: "
                  f"{' '.join(unknown[:10])}", file=sys.stderr)
        try:
            out = eng.generate(ids, args.max_tokens, temperature=args.temperature, seed=args.seed,
                               top_k=args.top_k)
        except ValueError as exc:
            raise _UserError(str(exc)) from exc
        print(" ".join(x for x in (eng.decode(ids), eng.decode(out)) if x))
        return 0
    return _guard("run", body, args)


def _stream_ids(eng, corpus, split: str) -> tuple[np.ndarray, int]:
    """The split as engine ids (mapping through words when the vocabularies differ)."""
    ids = getattr(corpus, split)
    if list(corpus.vocab) == eng.vocab:
        return ids, 0
    unk = eng.word2id.get("<unk>")
    table = np.array([eng.word2id.get(w, -1 if unk is None else unk) for w in corpus.vocab], np.int64)
    missing = [corpus.vocab[i] for i in np.flatnonzero(table < 0)]
    mapped = table[ids]
    if (mapped < 0).any():
        raise _UserError(f"{int((mapped < 0).sum())} {split} tokens are not in the artifact vocabulary "
                         f"(e.g. {missing[:5]}) and it has no <unk>")
    return mapped, sum(1 for w in corpus.vocab if w not in eng.word2id)


def cmd_eval(args) -> int:
    """Print the perplexity of the artifact on ``--data`` ``--split`` (state carried)."""
    def body(args):
        from g2quant.data.download import DataError
        from g2quant.data.ptb import load_ptb

        if args.batch_size < 1 or args.bptt < 1:
            raise _UserError("--batch-size and --bptt must be >= 1")
        eng = _load(args)
        try:
            corpus = load_ptb(args.data_dir, download=not args.no_download)
        except DataError as exc:
            raise _UserError(f"cannot load PTB: {exc}") from exc
        ids, n_unk_types = _stream_ids(eng, corpus, args.split)
        if n_unk_types:
            print(f"note: {n_unk_types} PTB word types are not in the artifact vocabulary; "
                  "they are scored as <unk>", file=sys.stderr)
        if args.limit is not None:
            ids = ids[: args.limit]
        try:
            rep = eng.perplexity(ids, batch_size=args.batch_size, bptt=args.bptt)
        except ValueError as exc:
            raise _UserError(str(exc)) from exc
        result = {"data": args.data, "split": args.split, "perplexity": rep.perplexity, "nll": rep.nll,
                  "tokens": rep.tokens, "batch_size": rep.batch_size, "bptt": rep.bptt,
                  "state": "carried across batches", "seconds": rep.seconds, "backend": eng.backend,
                  "artifact": str(args.artifact)}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{args.data} {args.split}: perplexity {rep.perplexity:.2f} over {rep.tokens} tokens "
                  f"(batch size {rep.batch_size}, bptt {rep.bptt}, state carried across batches; "
                  f"{rep.seconds:.1f} s, backend {eng.backend})")
        return 0
    return _guard("eval", body, args)


def cmd_bench(args) -> int:
    """Print per-step latency, tokens/s, artifact size and first-call time."""
    def body(args):
        if args.batch < 1 or args.tokens < 1 or args.repeats < 1:
            raise _UserError("--batch, --tokens and --repeats must be >= 1")
        t0 = time.perf_counter()
        eng = _load(args)
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        toks = rng.integers(0, eng.vocab_size, size=(args.tokens, args.batch)).astype(np.int64)
        st = eng.initial_state(args.batch)
        t0 = time.perf_counter()
        eng.step_(toks[0], st)
        first_s = time.perf_counter() - t0
        for t in toks[: min(10, args.tokens)]:     # warm-up
            eng.step_(t, st)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for t in toks:
                eng.step_(t, st)
            best = min(best, time.perf_counter() - t0)
        per_step = best / args.tokens
        feats = {}
        if hasattr(eng.kernels, "cpu_features"):
            feats = eng.kernels.cpu_features()
        result = {"artifact": str(args.artifact), "backend": eng.backend, "batch": args.batch,
                  "threads": args.threads, "vocab": eng.vocab_size, "hidden": eng.hidden_size,
                  "layers": eng.num_layers, "ms_per_step": per_step * 1e3,
                  "ms_per_token": per_step * 1e3 / args.batch, "tokens_per_s": args.batch / per_step,
                  "size_bytes": eng.size_bytes, "load_s": load_s, "first_call_s": first_s,
                  "cpu_features": feats}
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(f"{args.artifact}: vocab {eng.vocab_size}, hidden {eng.hidden_size}, {eng.num_layers} layers, "
                  f"backend {eng.backend}, threads {args.threads or 'default'}")
            print(f"  batch {args.batch}: {per_step * 1e3:.3f} ms/step, {per_step * 1e3 / args.batch:.4f} ms/token, "
                  f"{args.batch / per_step:,.0f} tokens/s (best of {args.repeats} x {args.tokens} steps)")
            print(f"  size {eng.size_bytes / 1e6:.3f} MB, load {load_s:.2f} s, first call {first_s * 1e3:.1f} ms")
        return 0
    return _guard("bench", body, args)
