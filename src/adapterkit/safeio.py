"""Crash-safe file I/O and safe weight loading.

Every writer here goes through a temporary file (or directory) in the same
directory as the target, fsyncs it, and renames it into place, so a crash or a
full disk never leaves a half-written file under the final name. Loaders never
unpickle arbitrary objects: safetensors files are parsed and checked, and legacy
``.bin``/``.pt``/``.pth`` files are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import CheckpointError

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "describe_os_error",
    "load_legacy_weights",
    "load_safetensors_checked",
    "load_weights",
    "read_safetensors_metadata",
    "recover_dir",
    "remove_stale_temps",
    "save_safetensors_atomic",
    "sha256_file",
    "write_probe",
]

LEGACY_SUFFIXES = (".bin", ".pt", ".pth")
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_ENOSPC_CODES = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ----------------------------------------------------------------------------- helpers


def describe_os_error(exc: OSError) -> str:
    """A short human reason for an OSError (disk full, read-only, permission denied...)."""
    code = exc.errno
    if code in _ENOSPC_CODES:
        return "disk full (no space left on device)"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOTDIR:
        return "a component of the path is a file, not a directory"
    if code == errno.EEXIST:
        return "a file with that name already exists"
    if code == errno.ENOENT:
        return "no such file or directory"
    return exc.strerror or str(exc)


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create directory {parent} for {path.name}: {describe_os_error(exc)}"
        ) from exc
    return parent


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + fsync dir)."""
    path = Path(path)
    parent = _ensure_parent(path)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=str(parent), prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {describe_os_error(exc)}") from exc
    finally:
        if tmp is not None:
            _unlink_quiet(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as strict JSON (no NaN/Infinity) and write it atomically."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot write {path}: value is not JSON-serialisable ({exc})") from exc
    return atomic_write_text(path, text + "\n")


def _siblings(final_dir: Path, tag: str) -> list[Path]:
    parent = final_dir.parent
    if not parent.is_dir():
        return []
    prefix = f".{final_dir.name}{tag}"
    return [p for p in parent.iterdir() if p.name.startswith(prefix)]


def recover_dir(final_dir: str | os.PathLike) -> bool:
    """Undo an interrupted :func:`atomic_dir` replace.

    If the process died after moving the old directory aside but before moving the
    new one in, ``final_dir`` is missing and ``.NAME.old-*`` exists: move it back.
    Returns True when something was restored.
    """
    final_dir = Path(final_dir)
    if final_dir.exists():
        return False
    olds = sorted(_siblings(final_dir, _OLD_TAG), key=lambda p: p.stat().st_mtime, reverse=True)
    if not olds:
        return False
    os.rename(olds[0], final_dir)
    _fsync_dir(final_dir.parent)
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (``.*.tmp-*`` dirs, ``.*.tmp`` files)
    directly inside ``directory``, after restoring any directory that was moved aside.
    Returns the removed paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    # restore first: a `.X.old-*` whose X is missing is the only good copy
    for p in list(directory.iterdir()):
        if p.name.startswith(".") and _OLD_TAG in p.name:
            name = p.name[1 : p.name.index(_OLD_TAG)]
            if name and not (directory / name).exists():
                with contextlib.suppress(OSError):
                    recover_dir(directory / name)
    removed: list[Path] = []
    for p in list(directory.iterdir()):
        if not p.name.startswith("."):
            continue
        stale = (p.is_dir() and (_TMP_TAG in p.name or _OLD_TAG in p.name)) or (
            p.is_file() and p.name.endswith(".tmp")
        )
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                _unlink_quiet(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Build a directory atomically.

    Yields a fresh temporary directory next to ``final_dir``. When the ``with`` body
    succeeds, every file in it is fsynced and the directory is renamed to
    ``final_dir`` (an existing ``final_dir`` is moved aside first, the new one moved
    in, then the old one deleted). When the body raises, the temporary directory is
    removed and ``final_dir`` is left untouched.
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final_dir)
        tmp = parent / f".{final_dir.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot create a directory next to {final_dir}: {describe_os_error(exc)}") from exc

    try:
        yield tmp
        # durability: contents first, then the directories that name them
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old_aside: Path | None = None
    try:
        if final_dir.exists():
            old_aside = parent / f".{final_dir.name}{_OLD_TAG}{uuid.uuid4().hex[:12]}"
            os.rename(final_dir, old_aside)
        try:
            os.rename(tmp, final_dir)
        except BaseException:
            if old_aside is not None:
                os.rename(old_aside, final_dir)
                old_aside = None
            raise
        _fsync_dir(parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot move the new directory into place at {final_dir}: {describe_os_error(exc)}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old_aside is not None:
        shutil.rmtree(old_aside, ignore_errors=True)


# ----------------------------------------------------------------------------- hashing & probing


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while True:
                block = fh.read(chunk_size)
                if not block:
                    break
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {describe_os_error(exc)}") from exc
    return digest.hexdigest()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def write_probe(directory: str | os.PathLike, min_free_bytes: int | None = None) -> Path:
    """Check that ``directory`` is writable before long work starts.

    Creates the directory if needed, writes, fsyncs and deletes a small probe file,
    and optionally checks that at least ``min_free_bytes`` are free. Raises
    :class:`CheckpointError` naming the directory and the reason (read-only, permission
    denied, disk full, path is a file...). Returns the directory.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"output directory {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output directory {directory}: {describe_os_error(exc)}") from exc

    probe = directory / f".adapterkit-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd: int | None = None
    try:
        fd = os.open(str(probe), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        payload = b"adapterkit write probe\n" * 8
        written = os.write(fd, payload)
        if written != len(payload):
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointError(f"output directory {directory} is not writable: {describe_os_error(exc)}") from exc
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quiet(probe)

    if min_free_bytes is not None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError as exc:
            raise CheckpointError(f"cannot query free space of {directory}: {describe_os_error(exc)}") from exc
        if free < int(min_free_bytes):
            raise CheckpointError(
                f"disk full: output directory {directory} has only {_fmt_bytes(free)} free, "
                f"need at least {_fmt_bytes(int(min_free_bytes))}"
            )
    return directory


# ----------------------------------------------------------------------------- safetensors


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share memory with another entry are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"cannot save {path}: tensor name {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"cannot save {path}: entry {name!r} is a {type(value).__name__}, not a torch.Tensor"
            )
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if t.numel() > 0:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            # a tensor that does not own all of its storage, or shares it, is copied
            if key in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
            seen.add(key)
        out[name] = t
    return out


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save ``tensors`` to a safetensors file atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta: dict[str, str] | None = None
    if metadata is not None:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CheckpointError(
                    f"cannot save {path}: safetensors metadata must map str to str, got {k!r}: {type(v).__name__}"
                )
            meta[k] = v
    prepared = _prepare_tensors(tensors, path)
    parent = _ensure_parent(path)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=str(parent), prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        save_file(prepared, str(tmp), metadata=meta)
        _fsync_file(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {describe_os_error(exc)}") from exc
    except Exception as exc:  # safetensors raises its own error types (e.g. unsupported dtype)
        raise CheckpointError(f"cannot write {path}: {exc}") from exc
    finally:
        if tmp is not None:
            _unlink_quiet(tmp)
    return path


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse and sanity-check a safetensors header; returns (header, header_len, file_size)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a safetensors file but {path} is a directory")
    bad = f"{path} is not a valid safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: it is truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                if n > 100_000_000:
                    raise CheckpointError(f"{bad}: it is corrupt or not a safetensors file (bad header length)")
                raise CheckpointError(
                    f"{bad}: it is truncated (header needs {n} bytes, file has {size - 8} after the length)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {describe_os_error(exc)}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{bad}: the header is corrupt or it is not a safetensors file ({exc})") from exc
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{bad}: the header entry for {name!r} is corrupt") from exc
    if 8 + n + end > size:
        raise CheckpointError(
            f"{bad}: it is truncated (expected {8 + n + end} bytes, file has {size})"
        )
    return header, n, size


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file (empty if none); checks the header."""
    header, _, _ = _read_header(Path(path))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_safetensors_checked(
    path: str | os.PathLike, *, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU, raising one clear :class:`CheckpointError` naming
    the file when it is missing, truncated, corrupt, not safetensors, or (when
    ``expected_sha256`` is given) does not match its checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _read_header(path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path} is corrupt: sha256 {actual[:12]}... does not match the recorded {expected_sha256[:12]}..."
            )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file: it is truncated, corrupt or in another format ({exc})"
        ) from exc


# ----------------------------------------------------------------------------- legacy pickles


def _unpickle_reason(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.startswith("Unsupported") or "WeightsUnpickler error" in line:
            return line
    return type(exc).__name__


def load_legacy_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt``/``.pth`` state dict with ``torch.load(weights_only=True)``.

    Pickles that contain anything but plain tensors/containers are refused (never
    executed). A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a weights file but {path} is a directory")
    if path.suffix.lower() not in LEGACY_SUFFIXES:
        raise CheckpointError(
            f"{path}: legacy weights must end in {', '.join(LEGACY_SUFFIXES)}; use .safetensors for other files"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains code/objects that are not plain tensors "
            f"({_unpickle_reason(exc)}); only weights-only files are accepted, convert it to .safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({str(exc).splitlines()[0]})") from exc

    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a name -> tensor mapping (found {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path} holds non-tensor entries, e.g. {bad[0]!r}; expected a flat state dict")
    return dict(obj)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weight file by extension: ``.safetensors`` (checked) or legacy (weights-only)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return load_safetensors_checked(path)
    return load_legacy_weights(path)
