"""PTB loader: the real files via $G2QUANT_DATA, errors, and the download + checksum cache."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from g2quant.data import download as dl
from g2quant.data.download import DataError
from g2quant.data.ptb import TRAIN_TOKENS, VOCAB_SIZE, load_ptb


def test_real_ptb_counts(data_root):
    c = load_ptb(data_root / "ptb")
    assert len(c.vocab) == VOCAB_SIZE == 10_000
    assert "<eos>" in c.vocab and "<unk>" in c.vocab
    assert len(c.train) == TRAIN_TOKENS == 929_589
    assert (len(c.valid), len(c.test)) == (73_760, 82_430)
    assert c.train.dtype == np.int64 and c.train.max() == VOCAB_SIZE - 1
    assert c.decode(c.encode("the company said <unk>")) == "the company said <unk>"


def test_env_variable_is_used(data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("G2QUANT_DATA", str(data_root))
    monkeypatch.setenv("G2QUANT_CACHE", str(tmp_path / "cache"))
    assert len(load_ptb(download=False).vocab) == VOCAB_SIZE


def _write_ptb(folder, train="a b c\n b a\n", valid="a b\n", test="c a\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"ptb.{name}.txt").write_text(text)
    return folder


def test_missing_folder_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_ptb(tmp_path / "nope")


def test_missing_file_error(tmp_path):
    f = _write_ptb(tmp_path / "p")
    (f / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match="lacks ptb.test.txt"):
        load_ptb(f)


def test_malformed_files(tmp_path):
    with pytest.raises(DataError, match="vocabulary has 4 words, expected 10000"):
        load_ptb(_write_ptb(tmp_path / "small"))
    with pytest.raises(DataError, match="valid line 1 has word 'zzz'"):
        load_ptb(_write_ptb(tmp_path / "oov", valid="a zzz\n"))
    f = _write_ptb(tmp_path / "bin")
    (f / "ptb.train.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_ptb(f)
    with pytest.raises(DataError, match="is empty"):
        load_ptb(_write_ptb(tmp_path / "empty", test="\n\n"))


def test_offline_without_data_names_the_places(tmp_path, monkeypatch):
    monkeypatch.delenv("G2QUANT_DATA", raising=False)
    monkeypatch.setenv("G2QUANT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="not found"):
        load_ptb(download=False)


def test_download_verifies_checksum_and_is_atomic(tmp_path):
    src = tmp_path / "remote.txt"
    src.write_bytes(b"hello ptb\n")
    good = hashlib.sha256(b"hello ptb\n").hexdigest()
    dest = tmp_path / "cache" / "file.txt"
    dl.download(src.as_uri(), dest, good, progress=False)
    assert dest.read_bytes() == b"hello ptb\n"
    bad_dest = tmp_path / "cache" / "bad.txt"
    with pytest.raises(DataError, match="checksum mismatch"):
        dl.download(src.as_uri(), bad_dest, "0" * 64, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["file.txt"]  # no partial file


def test_resolve_downloads_into_cache(tmp_path, monkeypatch):
    remote = _write_ptb(tmp_path / "remote")
    files = {n: (p.as_uri(), hashlib.sha256(p.read_bytes()).hexdigest())
             for n, p in ((p.name, p) for p in remote.iterdir())}
    monkeypatch.delenv("G2QUANT_DATA", raising=False)
    monkeypatch.setenv("G2QUANT_CACHE", str(tmp_path / "cache"))
    folder = dl.resolve_folder("ptb", files, None)
    assert folder == tmp_path / "cache" / "ptb"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_import_g2quant_does_not_import_torch():
    code = ("import sys, g2quant, g2quant.data.ptb, g2quant.targets, g2quant.calibration; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(g2quant.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
