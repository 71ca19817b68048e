"""What loading an artifact promises against a careless or hostile editor: every case is one
attack (named by the test) and the clear error it must get. The attacker recomputes checksums,
so these checks are about consistency, not integrity."""
import hashlib
import json
import os

import numpy as np
import pytest

from g2quant.targets.artifact import MAX_MANIFEST_BYTES, ArtifactError
from g2quant.targets.cpu.engine import Engine
from g2quant.targets.cpu.legacy_v1 import write_v1_lm_artifact
from g2quant.targets.cpu.target import read, write_lm_artifact
from g2quant.targets.cpu.testing import random_lm_weights

V, H, E = 40, 16, 12
VOCAB = ["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)]


@pytest.fixture
def art(tmp_path):
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=1)
    return write_lm_artifact(tmp_path / "m.g2q", w, VOCAB)


def _manifest(p):
    return json.loads((p / "manifest.json").read_text())


def _rewrite(p, man=None, files=None):
    """Save an edited manifest and/or files and recompute every checksum, as an attacker would."""
    man = _manifest(p) if man is None else man
    for name, data in (files or {}).items():
        (p / name).write_bytes(data)
    for name in man["files"]:
        if (p / name).is_file():
            man["files"][name] = hashlib.sha256((p / name).read_bytes()).hexdigest()
    (p / "manifest.json").write_text(json.dumps(man))


def test_fewer_layers_in_the_graph_than_parameters(art):
    man = _manifest(art)
    man["graph"]["nodes"][1]["attrs"]["num_layers"] = 1
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match=r"lstm parameters must be .*got"):
        read(art)


def test_decoder_pointed_at_the_embedding_silently_ties(art):
    man = _manifest(art)
    man["graph"]["nodes"][2]["params"]["weight"] = "embedding.weight"      # 'tie' an untied model
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match=r"linear takes 12 features, its input has 16|parameters not used"):
        read(art)


def test_scale_of_one_matrix_renamed_to_another_matrix_s(art):
    man = _manifest(art)
    man["params"]["rnn.l0.w_hh"]["scale"] = "rnn.l0.w_ih.scale"
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match="claimed by two parameters"):
        read(art)


def test_a_tensor_no_parameter_uses(art):
    man = _manifest(art)
    man["tensors"]["junk"] = {"dtype": "float32", "shape": [3]}
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match=r"tensors not used by any parameter: \['junk'\]"):
        read(art)


@pytest.mark.parametrize("value", [1e400, -3, 2 ** 40, "16", True, None], ids=str)
def test_hidden_size_that_is_not_a_small_positive_int(art, value):
    man = _manifest(art)
    man["graph"]["nodes"][1]["attrs"]["hidden_size"] = value
    (art / "manifest.json").write_text(json.dumps(man).replace("Infinity", "1e400"))
    _rewrite(art, json.loads((art / "manifest.json").read_text()))
    with pytest.raises(ArtifactError, match="hidden_size"):
        read(art)


@pytest.mark.parametrize("field,value,message", [
    ("hard_gates", ["i", "f"], "hard_gates"), ("hard_gates", "ifz", "hard_gates"),
    ("act_bits", 4, "act_bits"), ("bidirectional", "yes", "bidirectional"),
])
def test_wrong_json_types_in_node_attributes(art, field, value, message):
    man = _manifest(art)
    man["graph"]["nodes"][1]["attrs"][field] = value
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match=message):
        read(art)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["graph"].__setitem__("nodes", {"a": 1}), "graph.nodes must be a list"),
    (lambda m: m["graph"]["nodes"][0].__setitem__("inputs", 5), "inputs a list"),
    (lambda m: m["graph"]["nodes"][0].__setitem__("op", "conv2d"), "unknown op 'conv2d'"),
    (lambda m: m["graph"]["nodes"][2].__setitem__("inputs", ["decoder"]), "not the input or an earlier node"),
    (lambda m: m["params"]["rnn.l0.bias"].__setitem__("shape", [7]), "l0.bias must have shape"),
    (lambda m: m["params"]["rnn.l0.w_ih"].__setitem__("bits", 9), "bits=9 is invalid"),
    (lambda m: m["graph"]["output"].__setitem__("layout", "sideways"), "output layout"),
])
def test_malformed_graph(art, edit, message):
    man = _manifest(art)
    edit(man)
    _rewrite(art, man)
    with pytest.raises(ArtifactError, match=message):
        read(art)


def test_manifest_nested_ten_thousand_deep(art):
    (art / "manifest.json").write_text('{"a": ' * 10000 + "1" + "}" * 10000)
    with pytest.raises(ArtifactError, match="nested too deeply|does not parse"):
        read(art)


def test_manifest_larger_than_its_cap(art):
    with open(art / "manifest.json", "ab") as f:
        f.write(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ArtifactError, match="larger than the"):
        read(art)


def test_weights_symlinked_to_a_big_file_outside(art, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)                          # 1 GiB sparse: never read
    os.replace(art / "weights.safetensors", tmp_path / "orig")
    os.symlink(big, art / "weights.safetensors")
    with pytest.raises(ArtifactError, match="weights.safetensors: is a symbolic link"):
        read(art)


@pytest.mark.parametrize("name", ["vocab.txt", "manifest.json"])
def test_other_files_symlinked_outside(art, tmp_path, name):
    (tmp_path / "elsewhere").write_bytes((art / name).read_bytes())
    os.unlink(art / name)
    os.symlink(tmp_path / "elsewhere", art / name)
    with pytest.raises(ArtifactError, match=f"{name}: is a symbolic link"):
        read(art)


def test_weights_file_longer_than_its_header_says(art):
    with open(art / "weights.safetensors", "ab") as f:
        f.write(b"\0" * (1 << 20))
    with pytest.raises(ArtifactError, match="bytes on disk, the header describes"):
        read(art)


def test_header_declaring_another_shape_than_the_manifest(art):
    data = (art / "weights.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["decoder.bias"]["shape"] = [V // 2, 2]
    new = json.dumps(header).encode()
    _rewrite(art, files={"weights.safetensors": len(new).to_bytes(8, "little") + new + data[8 + n:]})
    with pytest.raises(ArtifactError, match=r"tensor 'decoder.bias' is float32 \[20, 2\]"):
        read(art)


def _poke_tensor(art, name, value):
    from safetensors.numpy import load, save
    ts = load((art / "weights.safetensors").read_bytes())
    t = ts[name].copy()
    t.reshape(-1)[0] = value
    ts[name] = t
    _rewrite(art, files={"weights.safetensors": save(ts)})


@pytest.mark.parametrize("tensor", ["decoder.bias", "rnn.l1.w_hh.scale", "rnn.l0.bias"])
def test_nan_written_into_a_float_tensor(art, tensor):
    _poke_tensor(art, tensor, np.nan)
    with pytest.raises(ArtifactError, match="contains NaN or infinite"):
        Engine.load(art)


def test_nan_in_a_format1_artifact(tmp_path):
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=1)
    p = write_v1_lm_artifact(tmp_path / "v1.g2q", w, VOCAB)
    _poke_tensor(p, "decoder_bias", np.inf)
    with pytest.raises(ArtifactError, match="contains NaN or infinite"):
        Engine.load(p)


@pytest.mark.parametrize("vocab,message", [
    (b"a\nb\na\n" + b"".join(f"x{i}\n".encode() for i in range(V - 3)), "duplicate"),
    (b"\r\n".join(w.encode() for w in VOCAB) + b"\r\n", "carriage returns"),
    (b"\n".join(w.encode() for w in VOCAB[:-1]) + b"\n", "has 39 words, the model's input has 40"),
    (b"\xff\xfe" * 10, "not UTF-8"),
])
def test_bad_vocabulary_file(art, vocab, message):
    _rewrite(art, files={"vocab.txt": vocab})
    with pytest.raises(ArtifactError, match=message):
        read(art)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["model"].__setitem__("num_layers", 1e400), "incomplete model description|out of range"),
    (lambda m: m.__setitem__("gates", ["i"]), "incomplete model description"),
    (lambda m: m["model"].__setitem__("num_layers", 10 ** 9), "out of range"),
], ids=["inf-layers", "gates-list", "huge-layers"])
def test_hostile_format1_manifest(tmp_path, edit, message):
    w = random_lm_weights(V, H, 2, 4, emb=E, seed=1)
    p = write_v1_lm_artifact(tmp_path / "v1.g2q", w, VOCAB)
    man = _manifest(p)
    edit(man)
    (p / "manifest.json").write_text(json.dumps(man).replace("Infinity", "1e400"))
    with pytest.raises(ArtifactError, match=message):
        Engine.load(p)
