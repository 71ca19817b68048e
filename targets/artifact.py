"""The g2quant artifact: a directory ``NAME.g2q/`` written atomically and verified on load.

Layout::

    NAME.g2q/
      manifest.json          format name + version, g2quant version, sha256 of every other file,
                             dtype/shape of every tensor, plus whatever the target writer adds
      weights.safetensors    all tensors (numpy arrays; no pickle anywhere)
      vocab.txt, ...         extra files (bytes), each listed with its sha256

Writing goes to a hidden temporary sibling directory (``.NAME.tmp-PID-*``); every file is
fsynced, then the directory is renamed into place, so a reader never sees a half-written
artifact and a failure leaves nothing behind. Replacing an existing artifact swaps the two
directories atomically where Linux allows (``renameat2(RENAME_EXCHANGE)``); elsewhere the old one
is renamed aside first (``.NAME.old-PID-*``) and deleted only after the new one is in place. What
a killed writer leaves is cleaned up by the next write or load of the same name (a lost
``NAME.g2q`` is restored from its ``.old-`` copy). Files get the user's umask like any other. Loading checks the format name and version, every checksum, and every
tensor's dtype and shape, raising ``ArtifactError`` naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "g2quant-artifact"
FORMAT_VERSION = 2          # 2: model-agnostic lowered graph; 1: word-LM only (still read)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
_RESERVED = (MANIFEST, WEIGHTS)
MAX_MANIFEST_BYTES = 16 << 20       # a manifest holds the graph and metadata, never weights
MAX_FILE_BYTES = 256 << 20          # extra files (vocabularies)
MAX_HEADER_BYTES = 16 << 20         # safetensors JSON header
_ST_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
              "I64": "int64", "U64": "uint64", "F16": "float16", "F32": "float32", "F64": "float64",
              "BOOL": "bool"}

__all__ = ["ArtifactError", "write_artifact", "load_artifact", "read_manifest", "clean_leftovers", "apply_umask",
           "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "artifact_size"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, of an unsupported format, or inconsistent."""


def _g2quant_version() -> str:
    try:
        from g2quant import __version__
        return str(__version__)
    except Exception:  # pragma: no cover - only when targets is used outside the package
        return "unknown"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"manifest value of type {type(obj).__name__} is not JSON serializable")


def _check_file_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"artifact file name must be a plain file name, got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"{name!r} is reserved for the artifact itself")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _serialize_tensors(tensors: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    from safetensors.numpy import save

    clean, listing = {}, {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"tensor {name!r}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype == object:
            raise ValueError(f"tensor {name!r}: object arrays cannot be stored")
        clean[name] = np.ascontiguousarray(arr)
        listing[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    return save(clean), listing


def write_artifact(path, manifest: dict, tensors: dict[str, np.ndarray],
                   files: dict[str, bytes] | None = None, *, format_version: int = FORMAT_VERSION) -> Path:
    """Write ``path`` (a directory, conventionally ``NAME.g2q``) atomically; return its Path.

    ``manifest`` is copied and completed with ``format``, ``format_version``,
    ``g2quant_version``, ``files`` (sha256 of every file) and ``tensors`` (each tensor's
    ``dtype`` and ``shape``, merged into any per-tensor entry the caller supplied).
    An existing artifact at ``path`` is replaced; an existing directory that is not an
    artifact (no manifest.json), or an existing file, is refused.
    """
    path = Path(path)
    files = dict(files or {})
    for name, data in files.items():
        _check_file_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"file {name!r}: contents must be bytes, got {type(data).__name__}")
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise ArtifactError(f"{path}: exists and is not an artifact directory; refusing to replace it")
        if not (path / MANIFEST).is_file():
            raise ArtifactError(f"{path}: exists but has no {MANIFEST} (not an artifact); refusing to replace it")

    blob, listing = _serialize_tensors(tensors)
    man = json.loads(json.dumps(manifest, default=_json_default))   # deep copy, JSON-clean
    entries = man.get("tensors", {})
    if not isinstance(entries, dict):
        raise ValueError("manifest['tensors'] must be a dict of per-tensor entries")
    unknown = sorted(set(entries) - set(listing))
    if unknown:
        raise ValueError(f"manifest lists tensors that were not given: {unknown}")
    for name, info in listing.items():
        entry = dict(entries.get(name, {}))
        for key in ("dtype", "shape"):
            if key in entry and entry[key] != info[key]:
                raise ValueError(f"tensor {name!r}: manifest says {key}={entry[key]}, array has {info[key]}")
        entry.update(info)
        entries[name] = entry
    payload = {WEIGHTS: bytes(blob), **{k: bytes(v) for k, v in files.items()}}
    man.update({
        "format": FORMAT,
        "format_version": format_version,
        "g2quant_version": _g2quant_version(),
        "tensors": entries,
        "files": {name: _sha256(data) for name, data in sorted(payload.items())},
    })
    text = json.dumps(man, indent=2, sort_keys=False, default=_json_default) + "\n"

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    old = None
    try:
        for name, data in payload.items():
            _write_file(tmp / name, data)
        _write_file(tmp / MANIFEST, text.encode("utf-8"))      # last: marks completeness
        apply_umask(tmp, directory=True)
        for f in tmp.iterdir():
            apply_umask(f)
        _fsync_dir(tmp)
        if path.exists() and _exchange(tmp, path):
            old = tmp                      # the previous artifact now sits in tmp's place
        else:
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
                os.rmdir(old)
                os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                if old is not None:
                    os.rename(old, path)       # put the previous artifact back
                    old = None
                raise
        _fsync_dir(path.parent)
    except BaseException:
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def apply_umask(path: Path, *, directory: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (0600/0700) the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    except OSError:  # pragma: no cover - e.g. filesystems without permissions
        pass


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    OS or the filesystem cannot, and the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> list[tuple[Path, str, int]]:
    """Hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings a killed writer left behind."""
    out = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return out
    for e in entries:
        name = e.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        for kind in ("tmp", "old"):
            if rest.startswith(kind + "-"):
                pid = rest[len(kind) + 1:].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    out.append((e, kind, int(pid)))
    return out


def clean_leftovers(path) -> list[str]:
    """Recover or remove what a writer killed mid-write left next to ``path``.

    If ``path`` is missing and a complete previous version survives (an ``.old-`` folder with
    its manifest, from a kill between the two renames of an overwrite) it is put back; every
    other leftover of a dead writer is deleted. Leftovers of live writers are not touched.
    Returns what was done, one line per folder."""
    path = Path(path)
    done = []
    for e, kind, _pid in sorted(_leftovers(path), key=lambda t: t[1] != "old"):
        if kind == "old" and not path.exists() and (e / MANIFEST).is_file():
            os.rename(e, path)
            done.append(f"restored {path} from {e.name}")
        else:
            shutil.rmtree(e, ignore_errors=True)
            done.append(f"removed {e.name}")
    return done


def _fail(msg: str):
    raise ArtifactError(msg)


def _regular_file(path: Path, name: str, limit: int) -> int:
    """Size of ``path``, refusing links, non-files and files over ``limit`` bytes."""
    if path.is_symlink():
        _fail(f"{name}: is a symbolic link; artifacts hold only regular files")
    if not path.is_file():
        _fail(f"{name}: missing from {path.parent}")
    size = path.stat().st_size
    if size > limit:
        _fail(f"{name}: {size} bytes is larger than the {limit}-byte limit for this file")
    return size


def read_manifest(path) -> dict:
    """The verified top level of ``path/manifest.json`` (format, version, file table)."""
    return _read_manifest(Path(path))


def _read_manifest(path: Path) -> dict:
    if not path.exists() and not path.is_symlink():
        clean_leftovers(path)                 # an overwrite killed between its two renames
    if not path.exists():
        _fail(f"{path}: artifact not found")
    if not path.is_dir():
        _fail(f"{path}: not an artifact directory (expected NAME.g2q/ with {MANIFEST})")
    mpath = path / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        _fail(f"{MANIFEST}: missing in {path} (not a g2quant artifact, or the write did not finish)")
    _regular_file(mpath, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{MANIFEST}: does not parse as JSON ({exc})")
    except RecursionError:
        _fail(f"{MANIFEST}: nested too deeply")
    if not isinstance(man, dict):
        _fail(f"{MANIFEST}: expected a JSON object, got {type(man).__name__}")
    if man.get("format") != FORMAT:
        _fail(f"{MANIFEST}: format is {man.get('format')!r}, expected {FORMAT!r}")
    ver = man.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        _fail(f"{MANIFEST}: invalid format_version {ver!r}")
    if ver > FORMAT_VERSION:
        _fail(f"{MANIFEST}: format_version {ver} is newer than this g2quant supports ({FORMAT_VERSION}); "
              "upgrade g2quant to load it")
    for key in ("files", "tensors"):
        if not isinstance(man.get(key), dict):
            _fail(f"{MANIFEST}: missing or invalid {key!r} table")
    if WEIGHTS not in man["files"]:
        _fail(f"{MANIFEST}: does not list {WEIGHTS}")
    return man


def load_artifact(path) -> tuple[dict, dict[str, np.ndarray], dict[str, bytes]]:
    """Load and verify an artifact; return ``(manifest, tensors, files)``.

    ``files`` holds the bytes of every listed file other than the weights. Raises
    ``ArtifactError`` for a missing directory or file, an unparsable manifest, an unknown
    format or a newer format version, a sha256 mismatch, or a tensor whose dtype/shape
    differs from the manifest.
    """
    path = Path(path)
    man = _read_manifest(path)
    contents: dict[str, bytes] = {}
    for name, digest in man["files"].items():
        if name != WEIGHTS:
            try:
                _check_file_name(name)
            except ValueError as exc:
                _fail(f"{MANIFEST}: bad file entry: {exc}")
        if not isinstance(digest, str):
            _fail(f"{MANIFEST}: file entry {name!r} has no sha256 string")
        fpath = path / name
        if name == WEIGHTS:
            _check_safetensors_header(fpath, man["tensors"])
        else:
            _regular_file(fpath, name, MAX_FILE_BYTES)
        data = fpath.read_bytes()
        if _sha256(data) != digest:
            _fail(f"{name}: sha256 mismatch (file truncated or modified)")
        contents[name] = data
    from safetensors.numpy import load

    try:
        tensors = load(contents.pop(WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        _fail(f"{WEIGHTS}: cannot be parsed as safetensors ({exc})")
    listed = man["tensors"]
    missing = sorted(set(listed) - set(tensors))
    if missing:
        _fail(f"{WEIGHTS}: tensors listed in the manifest are missing: {missing}")
    extra = sorted(set(tensors) - set(listed))
    if extra:
        _fail(f"{WEIGHTS}: tensors not listed in the manifest: {extra}")
    for name, entry in listed.items():
        arr = tensors[name]
        if not isinstance(entry, dict):
            _fail(f"{MANIFEST}: tensor entry {name!r} is not an object")
        if entry.get("dtype") != str(arr.dtype):
            _fail(f"{WEIGHTS}: tensor {name!r} has dtype {arr.dtype}, manifest says {entry.get('dtype')}")
        if list(entry.get("shape", [])) != list(arr.shape):
            _fail(f"{WEIGHTS}: tensor {name!r} has shape {list(arr.shape)}, manifest says {entry.get('shape')}")
    return man, tensors, contents


def _check_safetensors_header(fpath: Path, listed: dict) -> None:
    """Before reading the weights: the header must list exactly the manifest's tensors with their
    dtypes and shapes, and the file must be exactly as long as the header says."""
    size = _regular_file(fpath, WEIGHTS, 1 << 62)
    with open(fpath, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(f"{WEIGHTS}: truncated (no header)")
        hlen = int.from_bytes(head, "little")
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            _fail(f"{WEIGHTS}: header length {hlen} is invalid for a {size}-byte file")
        try:
            header = json.loads(f.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            _fail(f"{WEIGHTS}: header does not parse ({exc})")
    if not isinstance(header, dict):
        _fail(f"{WEIGHTS}: header is not an object")
    header.pop("__metadata__", None)
    missing, extra = sorted(set(listed) - set(header)), sorted(set(header) - set(listed))
    if missing:
        _fail(f"{WEIGHTS}: tensors listed in the manifest are missing: {missing[:8]}")
    if extra:
        _fail(f"{WEIGHTS}: tensors not listed in the manifest: {extra[:8]}")
    end = 0
    for name, info in header.items():
        entry = listed[name]
        try:
            dtype, shape, (lo, hi) = _ST_DTYPES.get(info["dtype"], info["dtype"]), list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            _fail(f"{WEIGHTS}: header entry {name!r} is malformed")
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or list(entry.get("shape", [])) != shape:
            _fail(f"{WEIGHTS}: tensor {name!r} is {dtype} {shape}, the manifest says "
                  f"{entry.get('dtype') if isinstance(entry, dict) else entry} "
                  f"{entry.get('shape') if isinstance(entry, dict) else ''}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi - lo == nbytes):
            _fail(f"{WEIGHTS}: tensor {name!r} has data offsets {[lo, hi]} for {nbytes} bytes")
        end = max(end, hi)
    if size != 8 + hlen + end:
        _fail(f"{WEIGHTS}: {size} bytes on disk, the header describes {8 + hlen + end}")


def artifact_size(path) -> int:
    """Total bytes on disk of the files in an artifact directory."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
