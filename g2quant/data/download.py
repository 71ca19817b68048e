"""Locate data files: explicit folder, then ``$G2QUANT_DATA/<name>``, then a user cache that is
filled by downloading with checksum verification."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

ENV_VAR = "G2QUANT_DATA"


class DataError(RuntimeError):
    """A data set is missing, corrupt or malformed."""


def cache_dir() -> Path:
    root = os.environ.get("G2QUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "g2quant")
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its sha256; raise DataError otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            bar = None
            if progress and sys.stderr.isatty():
                try:
                    from tqdm import tqdm       # optional: not part of the runtime-only install
                    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {dest.name}")
                except ImportError:
                    print(f"downloading {url}", file=sys.stderr)
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        got = sha256_file(Path(tmp))
        if got != sha256:
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
        os.replace(tmp, dest)
        return dest
    except Exception as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, DataError):
            raise
        raise DataError(f"could not download {url}: {exc}") from exc


def resolve_folder(name: str, files: dict[str, tuple[str, str]], path: str | os.PathLike | None,
                   *, download_ok: bool = True) -> Path:
    """Return a folder holding every file in ``files`` (``{filename: (url, sha256)}``).

    Order: ``path`` if given (must exist and hold the files), ``$G2QUANT_DATA/name``,
    the user cache (downloading missing files there when ``download_ok``).
    """
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"{name} data folder {folder} does not exist")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{name} data folder {folder} lacks {', '.join(missing)}")
        return folder
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env) / name
        if all((folder / f).is_file() for f in files):
            return folder
    folder = cache_dir() / name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not download_ok:
        where = f"${ENV_VAR}/{name}" if env else f"${ENV_VAR} (unset)"
        raise DataError(f"{name} data not found in {where} or {folder}; missing {', '.join(missing)}")
    for f in missing:
        url, sha = files[f]
        download(url, folder / f, sha)
    return folder
