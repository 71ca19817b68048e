"""Bit allocation: the exact knapsack against brute force, budgets respected with the target's own
size rule, sensitivities measured, bad budgets rejected clearly."""
import itertools
import json

import numpy as np
import pytest
import torch

import g2quant
from g2quant.allocate import (Allocation, allocate, block_bytes, pareto_front, parse_budget, sensitivity,
                              weight_blocks)
from g2quant.models import LMConfig, WordLM


def _brute(options, budget):
    best = None
    names = list(options)
    for combo in itertools.product(*(options[n].items() for n in names)):
        cost = sum(c for _, (c, _) in combo)
        sens = sum(s for _, (_, s) in combo)
        if cost <= budget and (best is None or sens < best[0] - 1e-12):
            best = (sens, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_pareto_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = {f"b{i}": {w: (float(rng.integers(1, 50)), float(rng.random())) for w in "abcd"} for i in range(5)}
    front = pareto_front(options)
    assert all(np.diff(front.cost) > 0) and all(np.diff(front.sens) < 0)          # a true front
    for budget in (5, 40, 90, 150, 250):
        want = _brute(options, budget)
        if want is None:
            with pytest.raises(ValueError, match="no allocation fits"):
                front.best_within(budget)
            continue
        i = front.best_within(budget)
        assert abs(front.sens[i] - want[0]) < 1e-12 and front.cost[i] <= budget
        picked = front.choices[i]
        assert sum(options[b][w][0] for b, w in picked.items()) == front.cost[i]


@pytest.mark.parametrize("text,want", [("2.5MB", ("bytes", 2.5e6)), ("800KiB", ("bytes", 819200.0)),
                                       ("150us", ("latency", 1.5e-4)), (1234, ("bytes", 1234.0))])
def test_parse_budget(text, want):
    kind, v = parse_budget(text)
    assert kind == want[0] and abs(v - want[1]) < 1e-9 * max(1, want[1])


@pytest.mark.parametrize("bad,message", [("-3MB", "not a number"), ("0MB", "must be positive"),
                                         ("3 parsecs", "unknown unit"), ("lots", "not a number")])
def test_bad_budgets(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(bad)


@pytest.fixture(scope="module")
def lm_and_sens():
    torch.manual_seed(0)
    m = WordLM(LMConfig(vocab_size=60, emb_size=16, hidden_size=16, gates="gumbel")).eval()
    tokens = np.random.default_rng(0).integers(0, 60, 600)
    return m, sensitivity(m, tokens, widths=(8, 4, 2, "binary"), batch_size=4, bptt=10)


def test_blocks_and_sensitivities(lm_and_sens):
    m, s = lm_and_sens
    names = [b["name"] for b in s["blocks"]]
    assert names == ["embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1",
                     "rnn.weight_hh_l1", "decoder.weight"]
    assert all(set(d) == {"8", "4", "2", "binary"} for d in s["delta"].values())
    assert all(abs(d["8"]) < 0.02 for d in s["delta"].values())          # 8 bits: near lossless
    assert any(abs(d["binary"]) > 10 * abs(d["8"]) for d in s["delta"].values())
    # each block is restored after its measurement: a second pass gives the same table
    tokens = np.random.default_rng(0).integers(0, 60, 600)
    again = sensitivity(m, tokens, widths=(8, 4, 2, "binary"), batch_size=4, bptt=10)
    assert again["delta"] == s["delta"] and again["base_loss"] == s["base_loss"]
    gates = weight_blocks(m, "gate")
    assert len(gates) == 2 + 4 * 4 and gates[1].name == "rnn.weight_ih_l0[i]" and gates[1].shape == (16, 16)


def test_sensitivity_with_hard_gates_measures_the_deployed_model(lm_and_sens):
    """hard_gates="if" measures every entry with the gates as deployed: the base loss is that of the
    hard-gate model, and a block's delta differs from the soft-gate measurement."""
    from g2quant.evaluate import lm_perplexity
    m, soft = lm_and_sens
    tokens = np.random.default_rng(0).integers(0, 60, 600)
    s = sensitivity(m, tokens, widths=(2,), batch_size=4, bptt=10, hard_gates="if")
    base = lm_perplexity(g2quant.quantize(m, bits=16, hard_gates="if"), torch.as_tensor(tokens), batch_size=4,
                         bptt=10)["loss"]
    assert s["base_loss"] == base and s["hard_gates"] == "if" and s["base_loss"] != soft["base_loss"]
    assert s["delta"]["rnn.weight_hh_l0"]["2"] != soft["delta"]["rnn.weight_hh_l0"]["2"]


def test_allocation_fits_the_budget_exactly_as_the_target_stores_it(lm_and_sens, tmp_path):
    m, s = lm_and_sens
    smallest = g2quant.quantize(m, bits="binary").size_bytes()
    largest = g2quant.quantize(m, bits=8).size_bytes()
    for budget in np.linspace(smallest, largest, 5):
        a = allocate(m, sens=s, budget=float(budget))
        q = g2quant.quantize(m, bits=a.bits_map())
        assert q.size_bytes() <= budget + 1e-6, (q.size_bytes(), budget)
        assert abs(q.size_bytes() - a.predicted["bytes"]) < 1e-6                    # predicted = actual
    with pytest.raises(ValueError, match="no allocation fits"):
        allocate(m, sens=s, budget=smallest / 2)
    a.save(tmp_path / "a.json")
    assert Allocation.load(tmp_path / "a.json").widths == a.widths
    # a mixed-width model exports and its engine equals torch
    p = q.export(tmp_path / "mixed.g2q")
    x = torch.randint(0, 60, (7, 3))
    eng = g2quant.load(p)
    y, _ = eng.run(x.numpy())
    assert float(np.abs(y - q(x)[0].detach().numpy()).max()) < 2e-3 * max(1.0, float(q(x)[0].abs().max()))


def test_block_bytes_match_the_targets(lm_and_sens):
    _, s = lm_and_sens
    b = s["blocks"][1]
    assert block_bytes(b, 4, "cpu") == 64 * 8 + 4 * 64          # 64 rows of 16 nibbles + row scales
    assert block_bytes(b, 3, "cpu") == block_bytes(b, 4, "cpu")   # 3-bit is stored in nibbles


def test_cli_allocate_writes_allocation_table_and_plot(tmp_path, capsys):
    from g2quant.cli import main
    run = tmp_path / "run"
    assert main(["train-lm", "--data", "synthetic", "--preset", "tiny", "--epochs", "1", "--max-batches", "10",
                 "--out", str(run), "-q", "--threads", "1"]) == 0
    out = tmp_path / "alloc"
    assert main(["allocate", str(run / "best.safetensors"), "--data", "synthetic", "--budget", "20KB",
                 "--widths", "8,4,2", "--calib-tokens", "800", "--out", str(out), "-q", "--no-measure"]) == 0
    a = Allocation.load(out / "allocation.json")
    assert a.predicted["bytes"] <= 20_000 and set(a.widths.values()) <= {"8", "4", "2"}
    assert (out / "table.md").read_text().count("|") > 10 and (out / "front.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["allocate", str(run / "best.safetensors"), "--data", "synthetic", "--budget", "3 parsecs",
                 "--out", str(out), "-q"]) == 2
    assert "unknown unit" in capsys.readouterr().err
    assert main(["finetune", str(run / "best.safetensors"), "--data", "synthetic", "--allocation",
                 str(out / "allocation.json"), "--max-batches", "2", "--out", str(tmp_path / "qat"), "-q",
                 "--threads", "1"]) == 0


def test_latency_profile_fits_and_round_trips(tmp_path):
    from g2quant.profiles import Profile, measure
    prof = measure(shapes=((64, 64), (256, 128), (512, 256)), widths=(4, 8), repeats=2, stream_pools=(1, 2))
    assert sorted(prof.stream) == [4, 8] and all(len(p) == 2 and all(v > 0 for _, v in p) for p in prof.stream.values())
    assert [round(w / 2 ** 20) for w, _ in prof.stream[4]] == [1, 2]
    assert set(prof.fit) == {4, 8} and all(a >= 0 and b >= 0 for a, b in prof.fit.values())
    again = Profile.from_toml(prof.to_toml(), "x")
    assert prof.overhead != 0.0 and again.overhead == pytest.approx(prof.overhead, rel=1e-6)
    for bw in prof.fit:
        assert again.fit[bw] == pytest.approx(prof.fit[bw], rel=1e-6)
    assert again.loop == prof.loop and all(np.allclose(again.stream[k], prof.stream[k], rtol=1e-5) for k in prof.stream)
    big, small = prof.seconds((512, 256), 4), prof.seconds((64, 64), 4)
    assert big >= small
    with pytest.raises(ValueError, match="no timings for 2-bit"):
        prof.seconds((64, 64), 2)


def test_cli_targets_lists_every_registered_target_and_the_shipped_profiles(capsys):
    from g2quant.cli import main
    from g2quant.profiles import shipped
    from g2quant.targets.base import BUILTIN
    assert main(["targets", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["targets"]) == sorted(BUILTIN)
    assert out["targets"]["cpu"]["available"] is True
    assert sorted(out["profiles"]) == sorted(shipped())
    assert main(["targets"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in BUILTIN) and "kernel profiles:" in text


def test_latency_allocation_adds_the_token_overhead_and_charges_no_product_for_the_embedding(lm_and_sens):
    from g2quant.profiles import Profile
    model, sens = lm_and_sens
    prof = Profile("t", "cpu", "avx2", "x", 1, {bw: (1e-6, 1e-9) for bw in (1, 2, 4, 8)}, [], overhead=7e-6)
    a = allocate(model, sens=sens, budget="1s", latency_profile=prof)         # everything fits: the best widths
    want = 7e-6 + sum(prof.seconds((b["rows"][1] - b["rows"][0], b["cols"]), a.widths[b["name"]])
                      for b in sens["blocks"] if b["kind"] != "embedding")
    assert a.predicted["latency"] == pytest.approx(want, rel=1e-12)
    assert a.predicted["fixed_seconds"] == 7e-6


def test_streaming_term_prices_the_working_set_and_the_allocator_uses_it(lm_and_sens, tmp_path):
    """A product costs a + max(in-cache compute, bytes x streaming rate at the token's working set);
    the rate is that of the smallest measured pool holding the working set, and never falls as the
    working set grows."""
    from g2quant.profiles import Profile
    fit = {bw: (1e-6, 1e-12) for bw in (1, 2, 4, 8)}
    pts = [(2.0 ** 20, 1e-11), (4 * 2.0 ** 20, 4e-11), (16 * 2.0 ** 20, 3e-11)]      # 16 MB dips: noise
    stream = {4: pts, 8: pts, 1: [(1.0, 2e-11)]}
    prof = Profile("t", "cpu", "avx2", "x", 1, fit, [], overhead=2e-6, stream=stream)
    shape = (1000, 500)                                                        # 4-bit: 250,000 bytes
    assert prof.seconds(shape, 4) == pytest.approx(1e-6 + 1e-12 * 5e5)        # no working set: in cache
    assert prof.seconds(shape, 4, 2.0 ** 20) == pytest.approx(1e-6 + 2.5e5 * 1e-11)
    assert prof.seconds(shape, 4, 2 * 2.0 ** 20) == pytest.approx(1e-6 + 2.5e5 * 4e-11)     # the next pool up
    assert prof.seconds(shape, 4, 64 * 2.0 ** 20) == pytest.approx(1e-6 + 2.5e5 * 4e-11)    # envelope, clamped
    assert prof.seconds(shape, 8, 1.0) == pytest.approx(1e-6 + 5e5 * 1e-11)               # below: first point
    products = [((1000, 500), 4), ((2000, 500), "binary")]
    ws = 2.5e5 + 2000 * 500 / 8
    assert prof.predict(products) == pytest.approx(2e-6 + sum(prof.seconds(s, w, ws) for s, w in products))
    again = Profile.from_toml(prof.to_toml(), "t")
    assert sorted(again.stream) == [1, 4, 8] and np.allclose(again.stream[4], pts, rtol=1e-6)
    assert prof.seconds(shape, 2, 64 * 2.0 ** 20) == pytest.approx(1e-6 + 1e-12 * 5e5)     # 2-bit: not measured
    bad = prof.to_toml().replace("seconds_per_byte = [", "seconds_per_byte = [1e-11, ", 1)
    with pytest.raises(ValueError, match=r"\[stream\.1\]"):
        Profile.from_toml(bad, "bad")
    # the allocator prices every product at the chosen allocation's own working set
    model, sens = lm_and_sens
    names = [b["name"] for b in sens["blocks"] if b["kind"] != "embedding"]
    shapes = {b["name"]: (b["rows"][1] - b["rows"][0], b["cols"]) for b in sens["blocks"]}
    slow = Profile("s", "cpu", "avx2", "x", 1, {bw: (1e-9, 1e-12) for bw in fit}, [], overhead=2e-6,
                   stream={bw: [(1.0, 1e-10), (2.0 ** 20, 1e-9)] for bw in fit})   # bandwidth-bound, slower when larger
    roomy = allocate(model, sens=sens, budget="1s", latency_profile=slow)
    chosen = [(shapes[n], roomy.widths[n]) for n in names]
    assert roomy.predicted["latency"] == pytest.approx(slow.predict(chosen), rel=1e-9)
    assert roomy.predicted["working_set_bytes"] == pytest.approx(sum(slow.packed_bytes(s, w) for s, w in chosen))
    narrowest = slow.predict([(shapes[n], "binary") for n in names])
    tight_s = (narrowest + roomy.predicted["latency"]) / 2
    tight = allocate(model, sens=sens, budget=f"{tight_s * 1e6:.3f}us", latency_profile=slow)
    chosen = [(shapes[n], tight.widths[n]) for n in names]
    assert slow.predict(chosen) <= tight_s * (1 + 1e-9)
    assert tight.predicted["latency"] == pytest.approx(slow.predict(chosen), rel=1e-9)
    assert tight.widths != roomy.widths
    with pytest.raises(ValueError, match="no allocation fits the latency budget"):
        allocate(model, sens=sens, budget=f"{narrowest * 0.9e6:.4f}us", latency_profile=slow)


def test_room_in_the_budget_goes_to_wider_widths_when_measurements_tie():
    """Blocks that measure as lossless at several widths (noise, or negative increases) get the
    widest the budget allows, not the narrowest; a narrower width never counts as better."""
    from g2quant.allocate import effective_sensitivity
    eff = effective_sensitivity({"8": 0.001, "4": -0.002, "2": 0.0, "binary": 0.5})
    assert eff["8"] < eff["4"] < eff["2"] < eff["binary"]               # ties broken toward wider
    assert eff["4"] - 0.0 < 1e-6 and abs(eff["8"] - eff["4"]) < 1e-6    # 8 is taken as good as 4 (running min)
    blocks = [{"name": f"b{i}", "param": f"b{i}", "rows": [0, 64], "cols": 64, "kind": "linear"} for i in range(3)]
    sens = {"blocks": blocks, "delta": {b["name"]: {"8": 0.0, "4": 0.0, "2": 0.0} for b in blocks}}
    m = torch.nn.Linear(4, 4)
    for budget, want in ((3 * 64 * 64 * 1.0 + 3 * 64 * 4, "8"), (3 * 64 * 64 * 0.5 + 3 * 64 * 4, "4")):
        a = allocate(m, sens=sens, budget=budget * 1.0)
        assert set(a.widths.values()) == {want}, (budget, a.widths)
