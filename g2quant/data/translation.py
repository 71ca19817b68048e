"""Parallel data for translation: Multi30k De-En (task 1) and IWSLT14 De-En in fairseq form.

Torch-free (numpy + the standard library; ``subword-nmt`` and ``sacremoses`` are imported only
by the functions that need them).

- :func:`load_multi30k` — the official lowercased, tokenized files (``tok/*.lc.norm.tok.*``),
  from ``path``, ``$G2QUANT_DATA/iwslt14/multi30k-substitute/tok`` or the user cache (downloaded
  from the official repository, sha256 checked); joint BPE learned on its train split with
  ``subword-nmt`` (:data:`MULTI30K_MERGES` merges, cached by the train files' sha256).
- :func:`load_iwslt14` — fairseq's ``prepare-iwslt14.sh`` output (``{train,valid,test}.{de,en}``
  after BPE, and ``code``). The shared folder holds only an 8,800-pair train *sample*: usable
  with ``allow_sample=True``, for smoke tests only. :func:`download_iwslt14` /
  :func:`prepare_iwslt14` are the standard recipe for users with internet.

Conventions: ids 0..3 are ``<pad> <s> </s> <unk>``; every source and target sequence ends with
``</s>``; the decoder reads ``<s>`` + target (:func:`target_batch`). Batches are time-major
``[T, B]`` like the language model's.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .download import ENV_VAR, DataError, cache_dir, resolve_folder, sha256_file

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")

# ---------------------------------------------------------------- Multi30k (official repository, task 1)
MULTI30K_NAME = "iwslt14/multi30k-substitute/tok"
MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
_M30K_BASE = f"https://raw.githubusercontent.com/multi30k/dataset/{MULTI30K_COMMIT}/data/task1/tok/"
MULTI30K_SPLIT_FILES = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
MULTI30K_LINES = {"train": 29_000, "valid": 1_014, "test": 1_000}
_M30K_SHA = {
    "train.lc.norm.tok.de": "cb5a23529b65ec2061f1dc446192a9c37382b63cc75f81a0be59d34894b3a505",
    "train.lc.norm.tok.en": "08925f8e0572bcd5a006702fc5fe20e2d77c6917d4eebd576fc20de6693c2119",
    "val.lc.norm.tok.de": "97232bd273eceb7207f689527386a97e4be2616b18ada47576bdaf96c8ae1f00",
    "val.lc.norm.tok.en": "46573ce391ae227f1c72f873392436a20ef18e0a6d518098cfbd70b77c8572ec",
    "test_2016_flickr.lc.norm.tok.de": "c6a33d39d48f9f510de147651316cd9d918e09ad0219df734a2f16b6baccacc4",
    "test_2016_flickr.lc.norm.tok.en": "5b7f32627cf99eced828311b955dae9800bb52bc8b91cf8b6526829e605b29d2",
}
MULTI30K_FILES = {f: (_M30K_BASE + f, sha) for f, sha in _M30K_SHA.items()}
# 8,000 joint merges: de/en vocabularies of 5.8k/4.4k types with few singletons (434/233), sentences
# only 14 %/7 % longer than in words; 10k merges gives 7.1k/5.2k types with 40 % more singletons
# (rare symbols whose embeddings barely train) for sequences 2-3 % shorter, 5k splits common words.
MULTI30K_MERGES = 8_000

# ---------------------------------------------------------------- IWSLT14 (fairseq prepare-iwslt14.sh)
IWSLT14_NAME = "iwslt14/bpe10k"
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
IWSLT14_MERGES = 10_000
IWSLT14_SHARED_SHA = {          # $G2QUANT_DATA/iwslt14/bpe10k (../shared/data/README.md)
    "code": "3dd02684b6693abce3ba59520425901b0b910abeec2ae6b15cc62e458441d503",
    "valid.de": "27660c689b99b54f0f858775527ff351c520f7581be90aac84b6d16f14624c9e",
    "valid.en": "1b1f2246625cc907fbd9c8195776434b24687c3fc4e068c6f3d3ec542846823f",
    "test.de": "0bca28e500495a4a9694ae134b0ae35526a280cb0966abbcf3c9af3edc3dfe10",
    "test.en": "c2951533a0b03557599978ea1726c440bdbb8210454d1e9ef3b87c2b6228ac43",
    "train-sample.de": "830e1ec6c20adfc738f1fa6417f623defc35eb3164aee4f3ffedb7d5102c0b02",
    "train-sample.en": "4ab268d8e5902a942188286abbfc0494238516a64625bb3654db56b9620b0550",
}
IWSLT14_TEST_PARTS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                      "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
# tokenized + lowercased test parts of the reference fairseq run (perl Moses): a prepared copy
# is compared with these and the manifest says which agree (sacremoses is a port of the perl tokenizer)
IWSLT14_REFERENCE_PARTS_SHA = {
    "IWSLT14.TED.dev2010.de": "ea908cf47527db56f4a4ce8cb77dc5363efe2e105a7df7ca0834e52d8868668f",
    "IWSLT14.TED.dev2010.en": "d1052267bd4ec704da0e24967156b90498548dc1ed540f6263709bf75163e041",
    "IWSLT14.TEDX.dev2012.de": "0e19341b50f255799aa8f1e78c1135338f35d030de8f0e8a0c1926b6bc0841e2",
    "IWSLT14.TEDX.dev2012.en": "f1dd9a91db6052f24a174a9be42d6f73e047256bcfdc752c77753e40aed7ad48",
    "IWSLT14.TED.tst2010.de": "74e0282043fd56d41a41be8f82b102967da1e4a938f47ae5ec1f3a7ae7741d22",
    "IWSLT14.TED.tst2010.en": "c2c271f85d544c082ca9a76adf0838015fbf800786f584ca6d2ef7cb0f94127a",
    "IWSLT14.TED.tst2011.de": "8c7a945b40be33a2d9cc386288dc508cbbfd6f8ac9b44a6187222a61387e4fef",
    "IWSLT14.TED.tst2011.en": "7ff60f53e1fe07e2e95296cb539d9f2cbe69e1b5dc866b2b90e85d8004b10821",
    "IWSLT14.TED.tst2012.de": "672c1b7effc0913b18df9376baa0fe0736f95d413c5828792bf274f2d3ddf3c9",
    "IWSLT14.TED.tst2012.en": "16ea6839ca5fd7ea7c49e589df40b62fd889618eb0ca93a964eb61e653bd5d19",
}
SAMPLE_WARNING = ("IWSLT14 train-sample (8,800 pairs) is for smoke tests only: never train on it for "
                  "reported results (the full split has 160,239 pairs)")

_BPE_RE = re.compile(r"(@@ )|(@@ ?$)")


def remove_bpe(line: str) -> str:
    """Undo subword-nmt segmentation: ``"ein hu@@ nd"`` -> ``"ein hund"``."""
    return _BPE_RE.sub("", line.rstrip("\n"))


# ---------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class Vocab:
    """Token list with ``<pad> <s> </s> <unk>`` at ids 0..3; the rest by train frequency."""

    tokens: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.tokens[:4] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {self.tokens[:4]}")
        if len(set(self.tokens)) != len(self.tokens):
            dup = [t for t, c in Counter(self.tokens).items() if c > 1]
            raise ValueError(f"vocabulary has duplicate tokens, e.g. {dup[:5]}")

    @classmethod
    def build(cls, lines: Iterable[str], *, min_count: int = 1) -> "Vocab":
        """From whitespace-tokenized lines; most frequent first, ties in order of first appearance."""
        counts = Counter(t for line in lines for t in line.split())
        for s in SPECIALS:
            if s in counts:
                raise DataError(f"the training text contains the reserved token {s!r}")
        order = sorted(counts.items(), key=lambda kv: -kv[1])         # stable: first appearance breaks ties
        return cls(SPECIALS + tuple(t for t, c in order if c >= min_count))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def encode(self, line: str, *, eos: bool = True) -> np.ndarray:
        """Ids of a (BPE'd) line; unknown tokens become ``<unk>``; ``</s>`` appended."""
        idx = self.index
        ids = [idx.get(t, UNK) for t in line.split()]
        if eos:
            ids.append(EOS)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens up to the first ``</s>``, without ``<pad>`` / ``<s>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.tokens[i])
        return " ".join(out)


# ---------------------------------------------------------------- reading files
def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (no line may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    lines = [line.strip() for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise DataError(f"{path}: line {empty[0]} is empty ({len(empty)} empty line(s)); a parallel file "
                        "needs one sentence per line")
    if not lines:
        raise DataError(f"{path} is empty")
    return lines


def read_parallel(src_path: Path, tgt_path: Path, *, expected: int | None = None) -> tuple[list[str], list[str]]:
    """Both sides of a parallel split; their line counts must agree (and equal ``expected``)."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"parallel files disagree: {src_path} has {len(src):,} lines but {tgt_path} has "
                        f"{len(tgt):,}")
    if expected is not None and len(src) != expected:
        raise DataError(f"{src_path} and {tgt_path} have {len(src):,} lines, expected {expected:,} "
                        "(a different version of the data set?)")
    return src, tgt


def _check_sha(folder: Path, table: dict[str, str]) -> None:
    for name, sha in table.items():
        got = sha256_file(folder / name)
        if got != sha:
            raise DataError(f"{folder / name} has sha256 {got}, expected {sha} (a different or damaged copy)")


# ---------------------------------------------------------------- BPE (subword-nmt)
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def learn_joint_bpe(src_lines: Sequence[str], tgt_lines: Sequence[str], merges: int) -> str:
    """subword-nmt codes (``#version: 0.2`` + merges) learned on both sides together."""
    from subword_nmt.learn_bpe import learn_bpe

    if merges < 1:
        raise ValueError(f"BPE needs at least one merge, got {merges}")
    out = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()):           # subword-nmt draws a tqdm bar
        learn_bpe(io.StringIO("\n".join(list(src_lines) + list(tgt_lines)) + "\n"), out, merges)
    return out.getvalue()


def cached_bpe_codes(src_path: Path, tgt_path: Path, merges: int, *, tag: str) -> Path:
    """Codes learned on two train files, cached in ``cache_dir()/bpe`` under their sha256."""
    key = hashlib.sha256(f"{sha256_file(src_path)}:{sha256_file(tgt_path)}:{merges}".encode()).hexdigest()[:16]
    path = cache_dir() / "bpe" / f"{tag}-{merges}-{key}.codes"
    if not path.is_file():
        src, tgt = read_lines(src_path), read_lines(tgt_path)
        _atomic_write(path, learn_joint_bpe(src, tgt, merges))
    return path


class BPE:
    """Apply subword-nmt codes (a file path or the codes' text) to tokenized lines."""

    def __init__(self, codes: str | os.PathLike):
        from subword_nmt.apply_bpe import BPE as _SubwordBPE

        text = Path(codes).read_text(encoding="utf-8") if isinstance(codes, os.PathLike) else codes
        if not text.startswith("#version"):
            raise DataError("BPE codes must start with a '#version' line (subword-nmt format)")
        self.codes_text = text
        self._bpe = _SubwordBPE(io.StringIO(text))

    def __call__(self, line: str) -> str:
        return self._bpe.process_line(line.strip())

    def apply(self, lines: Iterable[str]) -> list[str]:
        return [self(line) for line in lines]


# ---------------------------------------------------------------- splits and data sets
@dataclass
class ParallelSplit:
    """One split: BPE ids per sentence (each ends with ``</s>``) and the tokenized references."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    refs: list[str]                  # target side, tokenized, BPE removed (what BLEU compares with)
    src_text: list[str]              # source side, BPE'd (what the model reads)

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.src), np.int64, len(self.src))

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tgt), np.int64, len(self.tgt))

    def subset(self, n: int) -> "ParallelSplit":
        return ParallelSplit(self.src[:n], self.tgt[:n], self.refs[:n], self.src_text[:n])


@dataclass
class TranslationData:
    name: str
    src_lang: str
    tgt_lang: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    bpe_codes: str                   # subword-nmt codes text (stored in checkpoints)
    splits: dict[str, ParallelSplit] = field(default_factory=dict)
    sample: bool = False             # trained on a sample: a pipeline check, never a result
    folder: str = ""

    @property
    def train(self) -> ParallelSplit:
        return self.splits["train"]

    @property
    def valid(self) -> ParallelSplit:
        return self.splits["valid"]

    @property
    def test(self) -> ParallelSplit:
        return self.splits["test"]

    @cached_property
    def bpe(self) -> BPE:
        return BPE(self.bpe_codes)

    def describe(self) -> dict:
        return {"name": self.name, "pair": f"{self.src_lang}-{self.tgt_lang}", "sample": self.sample,
                "sizes": {k: len(v) for k, v in self.splits.items()},
                "vocab": {"src": len(self.src_vocab), "tgt": len(self.tgt_vocab)}}


def build_data(name: str, bpe_splits: dict[str, tuple[list[str], list[str]]], bpe_codes: str, *,
               src_lang: str = "de", tgt_lang: str = "en", sample: bool = False, folder: str = "") -> TranslationData:
    """Vocabularies from the BPE'd train split (per side) and id sequences of every split."""
    if "train" not in bpe_splits:
        raise DataError(f"{name}: no train split")
    src_vocab = Vocab.build(bpe_splits["train"][0])
    tgt_vocab = Vocab.build(bpe_splits["train"][1])
    splits = {}
    for split, (src, tgt) in bpe_splits.items():
        if len(src) != len(tgt):
            raise DataError(f"{name} {split}: {len(src)} source but {len(tgt)} target sentences")
        splits[split] = ParallelSplit([src_vocab.encode(s) for s in src], [tgt_vocab.encode(t) for t in tgt],
                                      [remove_bpe(t) for t in tgt], list(src))
    return TranslationData(name, src_lang, tgt_lang, src_vocab, tgt_vocab, bpe_codes, splits, sample, folder)


def load_multi30k(path: str | os.PathLike | None = None, *, download: bool = True, merges: int = MULTI30K_MERGES,
                  verify: bool = True) -> TranslationData:
    """Multi30k De-En task 1: train 29,000 / valid (val) 1,014 / test (test_2016_flickr) 1,000 pairs.

    Files from ``path``, ``$G2QUANT_DATA/iwslt14/multi30k-substitute/tok`` or the user cache
    (downloaded from github.com/multi30k/dataset at a pinned commit); sha256 checked when
    ``verify``. Joint BPE codes are learned on train once and cached (``cache_dir()/bpe``).
    """
    folder = resolve_folder(MULTI30K_NAME, MULTI30K_FILES, path, download_ok=download)
    if verify:
        _check_sha(folder, _M30K_SHA)
    tok = {}
    for split, stem in MULTI30K_SPLIT_FILES.items():
        tok[split] = read_parallel(folder / f"{stem}.lc.norm.tok.de", folder / f"{stem}.lc.norm.tok.en",
                                   expected=MULTI30K_LINES[split] if verify else None)
    codes = cached_bpe_codes(folder / "train.lc.norm.tok.de", folder / "train.lc.norm.tok.en", merges,
                             tag="multi30k")
    bpe = BPE(codes)
    bpe_splits = {s: (bpe.apply(src), bpe.apply(tgt)) for s, (src, tgt) in tok.items()}
    data = build_data("multi30k", bpe_splits, bpe.codes_text, folder=str(folder))
    for s, (_, tgt) in tok.items():          # references are the official tokenized files themselves
        data.splits[s].refs = list(tgt)
    return data


def tokenized_split(name: str, split: str, path: str | os.PathLike | None = None, *, download: bool = True,
                    allow_sample: bool = False) -> tuple[list[str], list[str]]:
    """Source and reference lines of one split, tokenized and lowercased, without BPE: what a
    model with its own BPE and vocabulary translates and is scored against. ``name``:
    ``"multi30k"`` or ``"iwslt14"`` (valid/test need no train split)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {SPLITS}")
    if name == "multi30k":
        folder = resolve_folder(MULTI30K_NAME, MULTI30K_FILES, path, download_ok=download)
        stem = MULTI30K_SPLIT_FILES[split]
        names = [f"{stem}.lc.norm.tok.{lang}" for lang in ("de", "en")]
        _check_sha(folder, {n: _M30K_SHA[n] for n in names})
        return read_parallel(folder / f"{stem}.lc.norm.tok.de", folder / f"{stem}.lc.norm.tok.en",
                             expected=MULTI30K_LINES[split])
    if name == "iwslt14":
        if split == "train":
            d = load_iwslt14(path, allow_sample=allow_sample, download=download)
            return [remove_bpe(s) for s in d.train.src_text], list(d.train.refs)
        env = os.environ.get(ENV_VAR)
        candidates = [Path(path)] if path is not None else \
            ([Path(env) / IWSLT14_NAME] if env else []) + [cache_dir() / IWSLT14_NAME]
        files = [f"{split}.de", f"{split}.en"]
        folder = next((c for c in candidates if _has(c, files)), None)
        if folder is None and download and path is None:
            folder = download_iwslt14()
        if folder is None:
            raise DataError(f"IWSLT14 {split} not found in {', '.join(str(c) for c in candidates)}"
                            + ("" if env or path else f" (${ENV_VAR} is unset)"))
        if env and folder == Path(env) / IWSLT14_NAME:
            _check_sha(folder, {f: IWSLT14_SHARED_SHA[f] for f in files})
        src, tgt = read_parallel(folder / files[0], folder / files[1])
        return [remove_bpe(s) for s in src], [remove_bpe(t) for t in tgt]
    raise DataError(f"unknown translation data set {name!r}; choose multi30k or iwslt14")


# ---------------------------------------------------------------- IWSLT14
def _has(folder: Path, names: Iterable[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _iwslt_names(train: str = "train") -> list[str]:
    return ["code"] + [f"{s}.{lang}" for s in (train, "valid", "test") for lang in ("de", "en")]


def _verify_manifest(folder: Path) -> None:
    """A prepared folder (``prepare_iwslt14``) lists each file's sha256 in manifest.json."""
    man = folder / "manifest.json"
    if not man.is_file():
        return
    try:
        table = json.loads(man.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{man} is damaged ({exc})") from None
    _check_sha(folder, {k: v for k, v in table.items() if "/" not in k})


def load_iwslt14(path: str | os.PathLike | None = None, *, allow_sample: bool = False, download: bool = False,
                 verify: bool = True) -> TranslationData:
    """IWSLT14 De-En after fairseq's preparation (joint 10k BPE): ``{train,valid,test}.{de,en}`` + ``code``.

    Looks in ``path``, ``$G2QUANT_DATA/iwslt14/bpe10k``, then ``cache_dir()/iwslt14/bpe10k`` (where
    :func:`download_iwslt14` prepares it; run when ``download``). Without a full train split,
    ``allow_sample=True`` uses ``train-sample.{de,en}`` (8,800 pairs) with a warning: for smoke
    tests, never for reported results.
    """
    env = os.environ.get(ENV_VAR)
    candidates = [Path(path)] if path is not None else \
        ([Path(env) / IWSLT14_NAME] if env else []) + [cache_dir() / IWSLT14_NAME]
    if path is not None and not Path(path).is_dir():
        raise DataError(f"IWSLT14 data folder {path} does not exist")
    folder = next((c for c in candidates if _has(c, _iwslt_names())), None)
    train, sample = "train", False
    with_sample = next((c for c in candidates if _has(c, _iwslt_names("train-sample"))), None)
    if folder is None and download and path is None and not (allow_sample and with_sample):
        folder = download_iwslt14()
    if folder is None:
        if with_sample is None or not allow_sample:
            where = ", ".join(str(c) for c in candidates) + ("" if env or path else f" (${ENV_VAR} is unset)")
            missing = [n for n in _iwslt_names() if not (candidates[0] / n).is_file()]
            hint = (" Only the 8,800-pair train-sample is there: pass allow_sample=True (--allow-sample) for a "
                    "smoke test, never for results." if with_sample is not None else "")
            raise DataError(f"IWSLT14 (fairseq form) not found in {where}: missing {', '.join(missing)}.{hint} "
                            "With internet, prepare the full set with g2quant.data.translation.download_iwslt14().")
        folder, train, sample = with_sample, "train-sample", True
        warnings.warn(SAMPLE_WARNING, stacklevel=2)
    if verify:
        if env and folder == Path(env) / IWSLT14_NAME:
            _check_sha(folder, {k: v for k, v in IWSLT14_SHARED_SHA.items() if (folder / k).is_file()
                                and (train == "train-sample" or "sample" not in k)})
        _verify_manifest(folder)
    splits = {s: read_parallel(folder / f"{f}.de", folder / f"{f}.en")
              for s, f in (("train", train), ("valid", "valid"), ("test", "test"))}
    codes = (folder / "code").read_text(encoding="utf-8")
    return build_data("iwslt14-sample" if sample else "iwslt14", splits, codes, sample=sample, folder=str(folder))


def _clean_pairs(src: list[str], tgt: list[str], *, ratio: float = 1.5, min_len: int = 1, max_len: int = 175,
                 max_word_length: int = 1000) -> tuple[list[str], list[str]]:
    """Moses ``clean-corpus-n.perl -ratio 1.5 ... 1 175``: normalize spaces, drop empty, too short /
    long pairs, pairs whose word-count ratio exceeds ``ratio`` and pairs with an over-long word."""
    out_s, out_t = [], []
    for s, t in zip(src, tgt):
        s, t = " ".join(s.split()), " ".join(t.split())
        ws, wt = s.split(" ") if s else [], t.split(" ") if t else []
        if not ws or not wt:
            continue
        if not (min_len <= len(ws) <= max_len and min_len <= len(wt) <= max_len):
            continue
        if len(ws) / len(wt) > ratio or len(wt) / len(ws) > ratio:
            continue
        if max(len(w) for w in ws + wt) > max_word_length:
            continue
        out_s.append(s)
        out_t.append(t)
    return out_s, out_t


_TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")
_TRAIN_STRIP = re.compile(r"</?title>|</?description>")
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def _train_text(path: Path) -> list[str]:
    """``train.tags.de-en.L`` without the talk headers (fairseq's grep/sed filters)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [_TRAIN_STRIP.sub("", line) for line in lines if not any(tag in line for tag in _TRAIN_DROP)]


def _xml_segments(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if "<seg id" in line:
            out.append(_SEG_CLOSE.sub("", _SEG_OPEN.sub("", line)).replace("\u2019", "'"))
    return out


def prepare_iwslt14(orig: str | os.PathLike, out: str | os.PathLike, *, merges: int = IWSLT14_MERGES,
                    src: str = "de", tgt: str = "en") -> Path:
    """fairseq's ``prepare-iwslt14.sh`` on an extracted ``de-en`` folder, written atomically to ``out``.

    Moses tokenization (sacremoses, escapes kept) and lowercasing; train cleaned with ratio 1.5 and
    lengths 1-175; valid = every 23rd cleaned train line (23, 46, ...), train = the rest; test =
    dev2010 + dev2012 + tst2010-2012; joint BPE with ``merges`` merges learned on train. Writes
    ``{train,valid,test}.{de,en}`` (BPE'd), ``code``, ``tokenized/`` (before BPE) and
    ``manifest.json`` (sha256 of every file, and which test parts equal the reference fairseq run's).
    """
    from sacremoses import MosesTokenizer

    orig, out = Path(orig), Path(out)
    pair = f"{src}-{tgt}"
    need = [f"train.tags.{pair}.{lang}" for lang in (src, tgt)] + \
        [f"{p}.{pair}.{lang}.xml" for p in IWSLT14_TEST_PARTS for lang in (src, tgt)]
    missing = [n for n in need if not (orig / n).is_file()]
    if missing:
        raise DataError(f"{orig} is not an extracted IWSLT14 {pair} folder: missing {', '.join(missing)}")
    toks = {lang: MosesTokenizer(lang=lang) for lang in (src, tgt)}

    def tok(lines, lang):
        return [toks[lang].tokenize(line, escape=True, return_str=True).lower() for line in lines]

    train_s = tok(_train_text(orig / f"train.tags.{pair}.{src}"), src)
    train_t = tok(_train_text(orig / f"train.tags.{pair}.{tgt}"), tgt)
    if len(train_s) != len(train_t):
        raise DataError(f"{orig}: train.tags.{pair}.{src} has {len(train_s)} sentences after removing the talk "
                        f"headers but train.tags.{pair}.{tgt} has {len(train_t)}")
    clean_s, clean_t = _clean_pairs(train_s, train_t)
    tokenized = {"valid": (clean_s[22::23], clean_t[22::23]),
                 "train": ([x for i, x in enumerate(clean_s) if i % 23 != 22],
                           [x for i, x in enumerate(clean_t) if i % 23 != 22])}
    parts = {}
    for p in IWSLT14_TEST_PARTS:
        ps = tok(_xml_segments(orig / f"{p}.{pair}.{src}.xml"), src)
        pt = tok(_xml_segments(orig / f"{p}.{pair}.{tgt}.xml"), tgt)
        if len(ps) != len(pt):
            raise DataError(f"{orig}: {p}.{pair}.{src}.xml has {len(ps)} segments but {p}.{pair}.{tgt}.xml has "
                            f"{len(pt)}")
        parts[p] = (ps, pt)
    tokenized["test"] = ([x for p in IWSLT14_TEST_PARTS for x in parts[p][0]],
                         [x for p in IWSLT14_TEST_PARTS for x in parts[p][1]])
    if not tokenized["train"][0]:
        raise DataError(f"{orig}: no training pair survives cleaning")
    codes = learn_joint_bpe(*tokenized["train"], merges)
    bpe = BPE(codes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        files = {"code": codes}
        text = lambda lines: "\n".join(lines) + "\n"     # noqa: E731
        for split, sides in tokenized.items():
            for lang, lines in zip((src, tgt), sides):
                files[f"{split}.{lang}"] = text(bpe.apply(lines))
                files[f"tokenized/{split}.{lang}"] = text(lines)
        for p, (s, t) in parts.items():
            files[f"tokenized/test-parts/{p}.{pair}.{src}"] = "\n".join(s) + "\n"
            files[f"tokenized/test-parts/{p}.{pair}.{tgt}"] = "\n".join(t) + "\n"
        sha = {}
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
            sha[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        agree = {f"{p}.{lang}": sha[f"tokenized/test-parts/{p}.{pair}.{lang}"] ==
                 IWSLT14_REFERENCE_PARTS_SHA.get(f"{p}.{lang}") for p in IWSLT14_TEST_PARTS for lang in (src, tgt)}
        manifest = {"recipe": "fairseq prepare-iwslt14.sh (sacremoses, clean ratio 1.5 lengths 1-175, valid every "
                              "23rd train line, joint BPE)", "merges": merges, "source": str(orig),
                    "sizes": {k: len(v[0]) for k, v in tokenized.items()}, "sha256": sha,
                    "test_parts_equal_reference_run": agree}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def download_iwslt14(out: str | os.PathLike | None = None, *, url: str = IWSLT14_URL, sha256: str | None = None,
                     merges: int = IWSLT14_MERGES) -> Path:
    """Download fairseq's IWSLT14 ``de-en.tgz``, extract it and :func:`prepare_iwslt14` it into
    ``out`` (default ``cache_dir()/iwslt14/bpe10k``). No checksum of the archive is published:
    give ``sha256`` to pin one; the sha256 found is recorded in the manifest either way, and the
    prepared test parts are compared with the reference run's (manifest)."""
    out = Path(out) if out is not None else cache_dir() / IWSLT14_NAME
    work = Path(tempfile.mkdtemp(dir=_mkdir(out.parent), prefix=".iwslt14-download."))
    try:
        archive = work / "de-en.tgz"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as f:
                shutil.copyfileobj(resp, f, 1 << 16)
        except OSError as exc:
            raise DataError(f"could not download {url}: {exc}") from None
        got = sha256_file(archive)
        if sha256 is not None and got != sha256:
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    raise DataError(f"{url}: refusing archive member {m.name!r}")
            tar.extractall(work / "x", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        orig = next((p.parent for p in (work / "x").rglob("train.tags.de-en.de")), None)
        if orig is None:
            raise DataError(f"{url}: the archive holds no train.tags.de-en.de")
        prepare_iwslt14(orig, out, merges=merges)
        man = json.loads((out / "manifest.json").read_text())
        man["archive"] = {"url": url, "sha256": got}
        _atomic_write(out / "manifest.json", json.dumps(man, indent=1))
        if not all(man["test_parts_equal_reference_run"].values()):
            warnings.warn(f"{out}: some prepared test parts differ from the reference fairseq run (see "
                          "manifest.json); BLEU may not be exactly comparable with published numbers", stacklevel=2)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------- batches
def pad_batch(seqs: Sequence[np.ndarray], *, bos: bool = False) -> np.ndarray:
    """Time-major ``[T, B]`` int64 batch, right-padded with ``<pad>``; ``bos`` prepends ``<s>``."""
    off = 1 if bos else 0
    T = max(len(s) for s in seqs) + off
    out = np.full((T, len(seqs)), PAD, dtype=np.int64)
    for b, s in enumerate(seqs):
        if bos:
            out[0, b] = BOS
        out[off:off + len(s), b] = s
    return out


def target_batch(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Decoder input (``<s>`` + target without its ``</s>``) and output (target with ``</s>``), ``[T, B]``."""
    out = pad_batch(seqs)
    inp = pad_batch([s[:-1] for s in seqs], bos=True)
    if inp.shape[0] < out.shape[0]:
        inp = np.concatenate([inp, np.full((out.shape[0] - inp.shape[0], inp.shape[1]), PAD, np.int64)])
    return inp, out


def bucket_batches(src_lengths: np.ndarray, tgt_lengths: np.ndarray | None, batch_size: int, *,
                   rng: np.random.Generator | None = None, bucket_width: int = 1) -> list[np.ndarray]:
    """Sentence indices in batches of at most ``batch_size`` whose source lengths fall in one
    bucket of ``bucket_width`` (1: equal lengths, so the encoder sees no padding); within a bucket
    sentences of similar target length go together. With ``rng`` the order inside buckets (ties)
    and the order of the batches are shuffled."""
    if batch_size < 1 or bucket_width < 1:
        raise ValueError(f"batch_size and bucket_width must be >= 1, got {batch_size} and {bucket_width}")
    src_lengths = np.asarray(src_lengths)
    n = len(src_lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    tgt = np.zeros(n, np.int64) if tgt_lengths is None else np.asarray(tgt_lengths)
    # sort by (bucket, target length); the permutation decides ties
    order = order[np.lexsort((tgt[order], src_lengths[order] // bucket_width))]
    buckets = src_lengths[order] // bucket_width
    batches = []
    for b in np.unique(buckets):
        idx = order[buckets == b]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
