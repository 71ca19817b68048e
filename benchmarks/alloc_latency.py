"""Latency budgets: the kernel profile's predicted per-token latency against the engine's measured one.

    python benchmarks/alloc_latency.py                 # measures the host profile, 2-layer LMs H 200/650
    python benchmarks/alloc_latency.py --ship          # and writes it to g2quant/profiles/<cpu>-<loop>.toml

The bit allocator's latency budgets (``g2quant allocate --budget 150us``) rest on
``g2quant.profiles``: per storage width, ``a + max(b · rows · cols, bytes · stream(working set))`` seconds per batch-1
product (in-cache compute, or the weight bytes at the streaming rate measured for the token's
whole working set), plus a per-token overhead measured on a tiny LM. Here that prediction is checked on random-weight
word LMs (vocab 10k, emb = hidden, 2 layers) at uniform and mixed widths (LSTM / decoder
widths differ), with the engine's batch-1 ``step_`` time measured in the same run (min over
repeats). Goal (bit-allocation issue): predicted within 15 % of measured. Writes
``benchmarks/results/alloc_latency.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (LSTM width, decoder width, embedding width) as random_lm_weights bits (1 = binary)
    (8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1), (2, 8, 4), (4, 2, 4), (8, 4, 2), (1, 4, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[200, 650])
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", action="store_true", help="also write the profile into g2quant/profiles/")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/alloc_latency.json"))
    args = ap.parse_args(argv)

    from g2quant.profiles import SHIPPED, lm_product_shapes, lm_token_seconds, measure, save_profile
    from g2quant.targets.cpu import isa
    from g2quant.targets.cpu.engine import Engine
    from g2quant.targets.cpu.testing import random_lm_weights

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    prof = measure(threads=args.threads, progress=lambda s: print("profile:", s, flush=True))
    profile_s = time.perf_counter() - t0
    if args.ship:
        path = save_profile(prof, SHIPPED / f"{prof.name}.toml")
        print(f"shipped {path}")
    rows = []
    for H in args.hidden:
        for lstm_b, dec_b, emb_b in CONFIGS:
            w = random_lm_weights(args.vocab, H, 2, lstm_b, dec_bits=dec_b, emb_bits=emb_b, seed=lstm_b)
            eng = Engine(w.to_graph(), threads=args.threads)
            measured = lm_token_seconds(eng, repeats=5, n=300 if H <= 200 else 100)
            wid = lambda b: "binary" if b == 1 else b  # noqa: E731
            shapes = lm_product_shapes(args.vocab, H, H, 2)
            products = [(s, wid(lstm_b)) for s in shapes[:-1]] + [(shapes[-1], wid(dec_b))]
            predicted = prof.predict(products)
            hot = prof.overhead + sum(prof.seconds(s, w) for s, w in products)     # without the streaming term
            r = {"hidden": H, "lstm_width": wid(lstm_b), "decoder_width": wid(dec_b), "embedding_width": wid(emb_b),
                 "measured_us": measured * 1e6, "predicted_us": predicted * 1e6,
                 "predicted_over_measured": predicted / measured,
                 "working_set_mb": sum(prof.packed_bytes(s, w) for s, w in products) / 2 ** 20,
                 "predicted_in_cache_us": hot * 1e6}
            rows.append(r)
            print(f"H {H} lstm {r['lstm_width']} dec {r['decoder_width']} emb {r['embedding_width']}: measured "
                  f"{r['measured_us']:.1f} us, predicted {r['predicted_us']:.1f} us "
                  f"({(r['predicted_over_measured'] - 1) * 100:+.1f} %)", flush=True)
    errs = [abs(r["predicted_over_measured"] - 1) for r in rows]
    result = {"benchmark": "alloc_latency", "command": "python benchmarks/alloc_latency.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M"), "kernels": isa.describe(), "threads": args.threads,
              "loadavg_1min_start_end": [load0, os.getloadavg()[0]], "profile": {
                  "name": prof.name, "loop": prof.loop, "overhead_us": prof.overhead * 1e6, "measure_seconds": profile_s,
                  "fit": {str(k): {"a_us": a * 1e6, "ps_per_mac": b * 1e12} for k, (a, b) in prof.fit.items()},
                  "stream_gb_s": {str(bw): {f"{w / 2 ** 20:g}MB": 1e-9 / v for w, v in pts}
                                  for bw, pts in prof.stream.items()}},
              "rows": rows, "max_abs_error": max(errs), "mean_abs_error": sum(errs) / len(errs),
              "goal": "predicted within 15 % of measured", "goal_met": max(errs) <= 0.15}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"max |error| {max(errs) * 100:.1f} %, mean {result['mean_abs_error'] * 100:.1f} %; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
