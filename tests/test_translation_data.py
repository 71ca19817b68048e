"""Translation data: vocabularies, BPE, batches, clear errors, Multi30k and IWSLT14 from the shared
folder, and the IWSLT14 preparation recipe run offline on a small made-up corpus."""
import hashlib
import json
import tarfile
import warnings

import numpy as np
import pytest

from g2quant.data import translation as tr
from g2quant.data.download import DataError
from g2quant.data.translation import (BOS, EOS, PAD, UNK, SPECIALS, Vocab, bucket_batches, pad_batch, read_parallel,
                                      remove_bpe, target_batch)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("G2QUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_vocab_order_encode_decode():
    v = Vocab.build(["b a c", "a b", "a d"])
    assert v.tokens == SPECIALS + ("a", "b", "c", "d")          # by count, ties by first appearance
    ids = v.encode("a zz d")
    assert ids.tolist() == [4, UNK, 7, EOS]
    assert v.decode([BOS, 4, PAD, 5, EOS, 6]) == "a b"             # stops at </s>, skips <s>/<pad>
    with pytest.raises(DataError, match="reserved token '<unk>'"):
        Vocab.build(["a <unk> b"])
    with pytest.raises(ValueError, match="must start with"):
        Vocab(("a", "b"))
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(SPECIALS + ("a", "a"))


@pytest.mark.parametrize("bpe, text", [("ein hu@@ nd .", "ein hund ."), ("ab@@ c@@ d e", "abcd e"),
                                       ("end@@", "end"), ("no bpe here", "no bpe here"), ("x@@ \n", "x")])
def test_remove_bpe(bpe, text):
    assert remove_bpe(bpe) == text


def test_bpe_learns_applies_and_round_trips():
    src = ["der hund läuft", "die hunde laufen", "ein hund"] * 5
    tgt = ["the dog runs", "the dogs run", "a dog"] * 5
    codes = tr.learn_joint_bpe(src, tgt, 6)
    assert codes.startswith("#version") and len(codes.strip().split("\n")) == 7
    bpe = tr.BPE(codes)
    seg = bpe.apply(["unbekannte hunde"])[0]
    assert "@@" in seg and remove_bpe(seg) == "unbekannte hunde"
    with pytest.raises(DataError, match="#version"):
        tr.BPE("not codes")


def test_bpe_codes_are_cached_by_the_train_files(tmp_path, cache, monkeypatch):
    a, b = tmp_path / "a.de", tmp_path / "a.en"
    a.write_text("ein hund\nzwei hunde\n")
    b.write_text("a dog\ntwo dogs\n")
    p1 = tr.cached_bpe_codes(a, b, 5, tag="t")
    assert p1.is_file() and p1.parent == cache / "bpe" and not list(p1.parent.glob("*.tmp"))
    monkeypatch.setattr(tr, "learn_joint_bpe", lambda *a: pytest.fail("learned again instead of reading the cache"))
    assert tr.cached_bpe_codes(a, b, 5, tag="t") == p1
    b.write_text("a dog\ntwo cats\n")                     # other train text: another key
    monkeypatch.undo()
    monkeypatch.setenv("G2QUANT_CACHE", str(cache))
    assert tr.cached_bpe_codes(a, b, 5, tag="t") != p1


def test_read_parallel_errors_name_the_files(tmp_path):
    de, en = tmp_path / "x.de", tmp_path / "x.en"
    de.write_text("a\nb\nc\n")
    en.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"x\.de has 3 lines but .*x\.en has 2"):
        read_parallel(de, en)
    en.write_text("a\n\nc\n")
    with pytest.raises(DataError, match=r"x\.en: line 2 is empty"):
        read_parallel(de, en)
    en.write_bytes(b"a\n\xff\nc\n")
    with pytest.raises(DataError, match=r"x\.en is not UTF-8"):
        read_parallel(de, en)
    with pytest.raises(DataError, match=r"missing\.en does not exist"):
        read_parallel(de, tmp_path / "missing.en")
    en.write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="expected 4"):
        read_parallel(de, en, expected=4)
    assert read_parallel(de, en) == (["a", "b", "c"], ["a", "b", "c"])


def test_padding_and_target_shift():
    seqs = [np.array([5, 6, EOS]), np.array([7, EOS])]
    assert pad_batch(seqs).T.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    tin, tout = target_batch(seqs)
    assert tin.shape == tout.shape == (3, 2)
    assert tin.T.tolist() == [[BOS, 5, 6], [BOS, 7, PAD]]
    assert tout.T.tolist() == [[5, 6, EOS], [7, EOS, PAD]]


def test_bucket_batches():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 9, 500), rng.integers(1, 30, 500)
    batches = bucket_batches(src, tgt, 16, rng=np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))                 # every sentence exactly once
    assert all(len(b) <= 16 and len(set(src[b])) == 1 for b in batches)   # no source padding
    same = bucket_batches(src, tgt, 16, rng=np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, same))
    other = bucket_batches(src, tgt, 16, rng=np.random.default_rng(2))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other))
    wide = bucket_batches(src, tgt, 16, bucket_width=3)
    assert all(len(set(src[b] // 3)) == 1 for b in wide) and len(wide) < len(batches)
    # inside a batch, target lengths are close: sorted within the bucket
    assert np.mean([np.ptp(tgt[b]) for b in bucket_batches(src, tgt, 16)]) < 6
    with pytest.raises(ValueError, match="batch_size"):
        bucket_batches(src, tgt, 0)


def test_build_data_and_split_helpers():
    d = tr.build_data("toy", {"train": (["a b", "b c"], ["x y", "y"]), "test": (["a q"], ["x@@ y z"])},
                      "#version: 0.2\n")
    assert len(d.src_vocab) == 7 and len(d.tgt_vocab) == 6
    assert d.test.src[0].tolist() == [d.src_vocab.index["a"], UNK, EOS]
    assert d.test.refs == ["xy z"] and d.test.src_text == ["a q"]
    assert d.train.src_lengths.tolist() == [3, 3] and len(d.train.subset(1)) == 1
    with pytest.raises(DataError, match="no train split"):
        tr.build_data("toy", {"test": (["a"], ["b"])}, "")


def test_multi30k_from_a_folder_checks_versions(tmp_path, cache):
    for split in ("train", "val", "test_2016_flickr"):
        (tmp_path / f"{split}.lc.norm.tok.de").write_text("ein hund .\nzwei katzen .\n")
        (tmp_path / f"{split}.lc.norm.tok.en").write_text("a dog .\ntwo cats .\n")
    with pytest.raises(DataError, match=r"train\.lc\.norm\.tok\.de has sha256 .* expected cb5a2352"):
        tr.load_multi30k(tmp_path, download=False)
    d = tr.load_multi30k(tmp_path, download=False, verify=False, merges=5)
    assert len(d.train) == 2 and d.test.refs == ["a dog .", "two cats ."]
    (tmp_path / "val.lc.norm.tok.en").write_text("a dog .\n")
    with pytest.raises(DataError, match=r"val\.lc\.norm\.tok\.de has 2 lines but .*val\.lc\.norm\.tok\.en has 1"):
        tr.load_multi30k(tmp_path, download=False, verify=False, merges=5)
    with pytest.raises(DataError, match="does not exist"):
        tr.load_multi30k(tmp_path / "nowhere", download=False)


def test_multi30k_shared(data_root, cache):
    d = tr.load_multi30k(download=False)
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 29_000, "valid": 1_014, "test": 1_000}
    assert (len(d.src_vocab), len(d.tgt_vocab)) == (5832, 4372)
    tok = data_root / tr.MULTI30K_NAME
    assert d.test.refs == (tok / "test_2016_flickr.lc.norm.tok.en").read_text().splitlines()
    src = (tok / "val.lc.norm.tok.de").read_text().splitlines()
    assert [remove_bpe(s) for s in d.valid.src_text] == src                    # BPE is lossless
    assert all(s[-1] == EOS for s in d.train.src[:100])
    assert len(list((cache / "bpe").glob("multi30k-8000-*.codes"))) == 1
    assert tr.tokenized_split("multi30k", "valid", download=False) == (src, d.valid.refs)


def test_iwslt14_shared_needs_allow_sample(data_root, cache):
    with pytest.raises(DataError, match="allow_sample=True"):
        tr.load_iwslt14()
    with pytest.warns(UserWarning, match="smoke tests only"):
        d = tr.load_iwslt14(allow_sample=True)
    assert d.sample and d.name == "iwslt14-sample"
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 8_800, "valid": 7_283, "test": 6_750}
    ref = (data_root / "iwslt14" / "tokenized" / "test.en").read_text().splitlines()
    assert d.test.refs == ref                                           # BPE removal restores the tokenized text
    src, refs = tr.tokenized_split("iwslt14", "test", download=False)
    assert refs == ref and src == (data_root / "iwslt14" / "tokenized" / "test.de").read_text().splitlines()


# ---------------------------------------------------------------- the preparation recipe, offline
_TALK = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks, science</keywords>",
         "<talkid>1</talkid>", "<title>{t}</title>", "<description>{d}</description>"]


def _fake_iwslt(folder):
    """A tiny de-en folder shaped like IWSLT14's: talk headers in train, <seg> XML for the test parts."""
    folder.mkdir(parents=True)
    de, en = [], []
    for i in range(60):
        de.append(f"Das ist Satz Nummer {i}, sagte Anna.")
        en.append(f"This is sentence number {i}, said Anna.")
    de[5], en[5] = "Ja.", "Well, this one is far too long for its source, so cleaning drops it."   # ratio > 1.5
    de[7], en[7] = "   ", "empty source"                                                        # empty: dropped
    hd = [h.format(t="Titel", d="Beschreibung") for h in _TALK]
    he = [h.format(t="Title", d="Description") for h in _TALK]
    (folder / "train.tags.de-en.de").write_text("\n".join(hd + de) + "\n")
    (folder / "train.tags.de-en.en").write_text("\n".join(he + en) + "\n")
    for p in tr.IWSLT14_TEST_PARTS:
        for lang, text in (("de", f"Ich hab’s in {p} gesagt"), ("en", f"I said it’s in {p}")):
            xml = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", '<doc docid="1">',
                   f'<seg id="1"> {text} </seg>', f'<seg id="2">Zweite Zeile {lang}.</seg>', "</doc>", "</mteval>"]
            (folder / f"{p}.de-en.{lang}.xml").write_text("\n".join(xml) + "\n")


def test_iwslt14_recipe_offline(tmp_path, cache):
    _fake_iwslt(tmp_path / "de-en")
    archive = tmp_path / "de-en.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "de-en", arcname="de-en")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match="checksum mismatch"):
        tr.download_iwslt14(out, url=archive.as_uri(), sha256="0" * 64, merges=20)
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # made-up test parts differ from the real ones
        tr.download_iwslt14(out, url=archive.as_uri(), sha256=sha, merges=20)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary leftovers
    man = json.loads((out / "manifest.json").read_text())
    assert man["archive"]["sha256"] == sha and man["merges"] == 20
    # 62 lines without the url/keywords/talkid headers (title and description text stay, as in fairseq's
    # script); cleaning drops 2, so 60 clean pairs: lines 23 and 46 are valid
    assert man["sizes"] == {"train": 58, "valid": 2, "test": 10}
    tok = lambda name: (out / "tokenized" / name).read_text().splitlines()   # noqa: E731
    assert tok("train.en")[:3] == ["title", "description", "this is sentence number 0 , said anna ."]
    assert tok("valid.en") == ["this is sentence number 22 , said anna .", "this is sentence number 45 , said anna ."]
    train_en = " ".join(tok("train.en"))
    assert "sentence number 5 ," not in train_en and "empty source" not in train_en and "<" not in train_en
    test_de = tok("test.de")
    # ’ -> ', then Moses rules per language (de splits the apostrophe, en keeps 's), escapes, lowercase
    assert test_de[0] == "ich hab &apos; s in iwslt14.ted.dev2010 gesagt"
    assert tok("test.en")[0] == "i said it &apos;s in iwslt14.ted.dev2010"
    assert test_de[1::2] == ["zweite zeile de ."] * 5
    assert test_de[8] == "ich hab &apos; s in iwslt14.ted.tst2012 gesagt"        # parts in fairseq's order
    assert len(man["test_parts_equal_reference_run"]) == 10
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            bped = (out / f"{split}.{lang}").read_text().splitlines()
            assert [remove_bpe(b) for b in bped] == tok(f"{split}.{lang}")
    d = tr.load_iwslt14(out)
    assert not d.sample and len(d.train) == 58 and d.valid.refs == tok("valid.en")
    (out / "test.en").write_text("tampered\n" * 10)
    with pytest.raises(DataError, match=r"test\.en has sha256"):
        tr.load_iwslt14(out)


def test_prepare_iwslt14_names_missing_files(tmp_path):
    (tmp_path / "de-en").mkdir()
    with pytest.raises(DataError, match=r"missing train\.tags\.de-en\.de"):
        tr.prepare_iwslt14(tmp_path / "de-en", tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        tr.load_iwslt14(tmp_path / "nowhere")
