"""Atomic write, verification and clear failures of ``g2quant.targets.artifact``."""
import json
import os

import numpy as np
import pytest

from g2quant.targets import artifact
from g2quant.targets.artifact import ArtifactError, load_artifact, write_artifact


def _tensors():
    rng = np.random.default_rng(0)
    return {"a": rng.integers(0, 255, size=(3, 5)).astype(np.uint8),
            "b": rng.standard_normal(7).astype(np.float32),
            "c": np.arange(4, dtype=np.int64).reshape(2, 2)}


def _write(path, **kw):
    man = kw.pop("manifest", {"target": "cpu", "tensors": {"a": {"bits": 4}}})
    return write_artifact(path, man, _tensors(), {"vocab.txt": "x\ny\n".encode()})


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    p = _write(tmp_path / "m.g2q")
    man, tensors, files = load_artifact(p)
    assert man["format"] == "g2quant-artifact" and man["format_version"] == artifact.FORMAT_VERSION
    assert man["target"] == "cpu" and "g2quant_version" in man
    assert set(man["files"]) == {"weights.safetensors", "vocab.txt"}
    assert man["tensors"]["a"] == {"bits": 4, "dtype": "uint8", "shape": [3, 5]}
    for k, v in _tensors().items():
        np.testing.assert_array_equal(tensors[k], v)
        assert tensors[k].dtype == v.dtype
    assert files == {"vocab.txt": b"x\ny\n"}
    assert _leftovers(tmp_path) == []
    assert artifact.artifact_size(p) == sum(f.stat().st_size for f in p.iterdir())


def test_truncated_weights(tmp_path):
    p = _write(tmp_path / "m.g2q")
    w = p / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    # caught from the header, before the file is read
    with pytest.raises(ArtifactError, match=r"weights.safetensors: \d+ bytes on disk, the header describes \d+"):
        load_artifact(p)


def test_corrupted_byte(tmp_path):
    p = _write(tmp_path / "m.g2q")
    w = p / "vocab.txt"
    data = bytearray(w.read_bytes())
    data[1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="vocab.txt: sha256 mismatch"):
        load_artifact(p)


def _edit_manifest(p, **changes):
    m = json.loads((p / "manifest.json").read_text())
    m.update(changes)
    (p / "manifest.json").write_text(json.dumps(m))


def test_newer_format_version(tmp_path):
    p = _write(tmp_path / "m.g2q")
    _edit_manifest(p, format_version=artifact.FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match=rf"format_version {artifact.FORMAT_VERSION + 1} is newer than this "
                                            rf"g2quant supports \({artifact.FORMAT_VERSION}\)"):
        load_artifact(p)


def test_wrong_format_name_and_bad_json(tmp_path):
    p = _write(tmp_path / "m.g2q")
    _edit_manifest(p, format="something-else")
    with pytest.raises(ArtifactError, match="format is 'something-else'"):
        load_artifact(p)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: does not parse"):
        load_artifact(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        load_artifact(tmp_path / "nope.g2q")
    p = _write(tmp_path / "m.g2q")
    (p / "vocab.txt").unlink()
    with pytest.raises(ArtifactError, match="vocab.txt: missing"):
        load_artifact(p)
    (p / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_artifact(p)


def test_tensor_shape_mismatch_in_manifest(tmp_path):
    p = _write(tmp_path / "m.g2q")
    m = json.loads((p / "manifest.json").read_text())
    m["tensors"]["b"]["shape"] = [8]
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"tensor 'b' is float32 \[7\], the manifest says float32 \[8\]"):
        load_artifact(p)
    m["tensors"]["b"]["shape"] = [7]
    m["tensors"]["zzz"] = {"dtype": "float32", "shape": [1]}
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="missing: \\['zzz'\\]"):
        load_artifact(p)


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = artifact._write_file

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(artifact, "_write_file", flaky)
    with pytest.raises(OSError, match="simulated"):
        _write(tmp_path / "m.g2q")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_overwrite_keeps_old(tmp_path, monkeypatch):
    p = _write(tmp_path / "m.g2q", manifest={"target": "old"})
    monkeypatch.setattr(artifact, "_write_file", lambda path, data: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        _write(p, manifest={"target": "new"})
    assert load_artifact(p)[0]["target"] == "old"
    assert _leftovers(tmp_path) == []


def test_failure_in_final_rename_restores_old(tmp_path, monkeypatch):
    p = _write(tmp_path / "m.g2q", manifest={"target": "old"})
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(artifact.os, "rename", rename)
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)      # the two-rename fallback
    with pytest.raises(OSError, match="simulated"):
        _write(p, manifest={"target": "new"})
    monkeypatch.undo()
    assert load_artifact(p)[0]["target"] == "old"
    assert _leftovers(tmp_path) == []


def test_overwrite(tmp_path):
    p = _write(tmp_path / "m.g2q", manifest={"target": "old"})
    (p / "stale.txt").write_text("left over")
    _write(p, manifest={"target": "new"})
    assert load_artifact(p)[0]["target"] == "new"
    assert not (p / "stale.txt").exists()
    assert _leftovers(tmp_path) == []


def test_refuses_to_replace_non_artifact(tmp_path):
    d = tmp_path / "important"
    d.mkdir()
    (d / "data.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an artifact"):
        _write(d)
    assert (d / "data.txt").read_text() == "keep me"
    f = tmp_path / "file.g2q"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not an artifact"):
        _write(f)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        write_artifact(tmp_path / "a.g2q", {}, {}, {"../evil": b""})
    with pytest.raises(ValueError, match="reserved"):
        write_artifact(tmp_path / "a.g2q", {}, {}, {"manifest.json": b""})
    with pytest.raises(ValueError, match="not given"):
        write_artifact(tmp_path / "a.g2q", {"tensors": {"x": {}}}, {}, {})
    with pytest.raises(ValueError, match="numpy array"):
        write_artifact(tmp_path / "a.g2q", {}, {"x": [1, 2]}, {})
    assert list(tmp_path.iterdir()) == []


def test_no_pickle_in_module():
    src = open(artifact.__file__).read()
    assert "pickle" not in src.replace("no pickle", "")
