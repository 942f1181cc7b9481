"""Crash-safe file I/O and safe weight loading.

Every writer here goes through a temporary file (or directory) in the same
directory as the target, fsyncs it, and renames it into place, so a crash or a
full disk never leaves a half-written file under the final name. Loaders never
unpickle arbitrary objects: safetensors files are parsed and checked, and legacy
``.bin``/``.pt``/``.pth`` files are read only with ``torch.load(weights_only=True)``.

Every safetensors file written here records a SHA-256 of its tensors (names, dtypes,
shapes and data bytes) in its ``__metadata__``; every read verifies it, so a bit flip,
a truncation or a file rewritten with a subset of the keys is refused with one
:class:`CheckpointError`. Files written by other tools (no checksum) still load.
The header is validated (types, offsets, sizes against the file) before anything is
allocated from it.

Every JSON/YAML document the library reads goes through :func:`loads_json` /
:func:`loads_yaml`: nesting deeper than :data:`MAX_DEPTH`, more than a node budget
(YAML aliases that expand exponentially) and duplicate keys give one error of the
caller's class naming the file, never a ``RecursionError`` or a hang.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import stat
import struct
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import AdapterKitError, CheckpointError, ConfigError

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "describe_os_error",
    "estimate_checkpoint_bytes",
    "check_nesting",
    "loads_json",
    "loads_yaml",
    "read_json_file",
    "load_legacy_weights",
    "load_safetensors_checked",
    "load_weights",
    "read_safetensors_index",
    "read_safetensors_metadata",
    "recover_dir",
    "remove_stale_temps",
    "save_safetensors_atomic",
    "sha256_file",
    "tensors_sha256",
    "write_probe",
]

logger = logging.getLogger(__name__)

LEGACY_SUFFIXES = (".bin", ".pt", ".pth")
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_ENOSPC_CODES = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

#: deepest nesting accepted in any JSON/YAML document the library reads
MAX_DEPTH = 64
#: the most values a YAML/JSON config may expand to (aliases counted each time they are used)
MAX_CONFIG_NODES = 100_000
#: largest safetensors header accepted (bytes)
MAX_HEADER_BYTES = 100_000_000
#: metadata key holding the checksum of a safetensors file written by :func:`save_safetensors_atomic`
CHECKSUM_KEY = "adapterkit.tensors_sha256"


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


def _create_temp(parent: Path, name: str) -> tuple[int, Path]:
    """A new temp file ``.NAME.<random>.tmp`` in ``parent``, created with mode 0o666 so the
    process umask decides its permissions (as for any file the user creates; ``mkstemp``
    would force 0o600). Never follows a symlink planted at the temp name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = parent / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            return os.open(str(tmp), flags, 0o666), tmp
        except FileExistsError:
            continue


# ----------------------------------------------------------------------------- safe JSON / YAML


def check_nesting(obj: Any, *, what: str, error: type[AdapterKitError] = ConfigError,
                  max_depth: int = MAX_DEPTH, max_nodes: int | None = None) -> Any:
    """Raise ``error`` naming ``what`` when ``obj`` nests deeper than ``max_depth`` or (with
    ``max_nodes``) holds more values than that, counting a shared (aliased) value every
    time it appears. Iterative: never recurses. Returns ``obj``."""
    stack = [(obj, 1)]
    nodes = 0
    while stack:
        o, depth = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        if depth > max_depth:
            raise error(f"{what} is nested too deeply (more than {max_depth} levels)")
        if max_nodes is not None:
            nodes += len(children)
            if nodes > max_nodes:
                raise error(f"{what} expands to more than {max_nodes:,} values "
                            "(YAML aliases repeating a large value?)")
        for c in children:
            if isinstance(c, (dict, list, tuple)):
                stack.append((c, depth + 1))
    return obj


def _no_duplicates(what: str, error: type[AdapterKitError]):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise error(f'{what} has the key "{k}" twice')
            out[k] = v
        return out

    return hook


def loads_json(text: str | bytes, *, what: str, error: type[AdapterKitError] = CheckpointError,
               max_depth: int = MAX_DEPTH, max_nodes: int | None = None,
               reject_duplicates: bool = True) -> Any:
    """``json.loads`` that fails with one ``error`` naming ``what``: invalid JSON or UTF-8,
    nesting deeper than ``max_depth``, more than ``max_nodes`` values, duplicate keys."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 text (byte {exc.start})") from None
    hook = _no_duplicates(what, error) if reject_duplicates else None
    try:
        obj = json.loads(text, object_pairs_hook=hook)
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise error(f"{what} is not valid JSON ({exc})") from None
    # fewer brackets than the limit cannot nest deeper: skip the walk for the usual small documents
    if text.count("[") + text.count("{") > max_depth or max_nodes is not None:
        check_nesting(obj, what=what, error=error, max_depth=max_depth, max_nodes=max_nodes)
    return obj


def read_json_file(path: str | os.PathLike, *, what: str | None = None,
                   error: type[AdapterKitError] = CheckpointError, max_bytes: int | None = None,
                   **kw) -> Any:
    """Read and parse a JSON file with :func:`loads_json`; a missing, unreadable or (with
    ``max_bytes``) oversized file is one ``error`` naming it."""
    path = Path(path)
    what = what or str(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{what} is larger than {_fmt_bytes(max_bytes)}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} is missing") from None
    except IsADirectoryError:
        raise error(f"{what} is a directory, not a JSON file") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {describe_os_error(exc)}") from None
    return loads_json(raw, what=what, error=error, **kw)


#: YAML 1.2 floats as well as YAML 1.1's: ``1e-3``, ``1E5``, ``2e+2`` and ``-.5`` are numbers
#: (PyYAML's YAML 1.1 resolver needs a dot and a signed exponent, so it reads ``1e-3`` as the
#: string "1e-3"); plus YAML 1.1's ``1_000.5``, ``190:20:30.15``, ``.inf`` and ``.nan``
_YAML_FLOAT = re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    | [-+]?\.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN)
    )$""", re.X)
_YAML_FLOAT_TAG = "tag:yaml.org,2002:float"


def _yaml_resolvers(base) -> dict:
    """``base.yaml_implicit_resolvers`` with the float resolver's pattern replaced by
    :data:`_YAML_FLOAT` (in place, so the other resolvers keep their order)."""
    out = {first: [(tag, _YAML_FLOAT if tag == _YAML_FLOAT_TAG else rx) for tag, rx in entries]
           for first, entries in base.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        entries = out.setdefault(first, [])
        if not any(tag == _YAML_FLOAT_TAG for tag, _ in entries):
            entries.append((_YAML_FLOAT_TAG, _YAML_FLOAT))
    return out


def _yaml_loader(what: str, error: type[AdapterKitError], max_depth: int):
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys and deep nesting while composing, and reads
        YAML 1.2 floats (``1e-3``) as numbers."""

        yaml_implicit_resolvers = _yaml_resolvers(yaml.SafeLoader)

        def compose_node(self, parent, index):
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > max_depth:
                    raise error(f"{what} is nested too deeply (more than {max_depth} levels)")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            if isinstance(node, yaml.MappingNode):
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        dup = key in seen
                        seen.add(key)
                    except TypeError:
                        continue  # unhashable: the base class raises its own error
                    if dup:
                        line = key_node.start_mark.line + 1
                        raise error(f'{what} line {line}: the key "{key}" is given twice')
            return super().construct_mapping(node, deep=deep)

    return Loader


def loads_yaml(text: str | bytes, *, what: str, error: type[AdapterKitError] = ConfigError,
               max_depth: int = MAX_DEPTH, max_nodes: int | None = MAX_CONFIG_NODES) -> Any:
    """``yaml.safe_load`` (JSON is YAML too) failing with one ``error`` naming ``what``:
    invalid YAML/UTF-8, duplicate keys, nesting deeper than ``max_depth``, more than
    ``max_nodes`` values once aliases are expanded (the "billion laughs")."""
    import yaml

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 text (byte {exc.start})") from None
    loader = None
    try:
        loader = _yaml_loader(what, error, max_depth)(text)  # the reader checks the characters here
        obj = loader.get_single_data()
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {max_depth} levels)") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML/JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise error(f"{what} is not valid YAML/JSON: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return check_nesting(obj, what=what, error=error, max_depth=max_depth, max_nodes=max_nodes)


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + fsync dir)."""
    path = Path(path)
    parent = _ensure_parent(path)
    tmp: Path | None = None
    try:
        fd, tmp = _create_temp(parent, path.name)
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


def estimate_checkpoint_bytes(tensors: Mapping[str, torch.Tensor], optimizer_slots: int = 2,
                              overhead: int = 1 << 20) -> int:
    """Bytes one training checkpoint of ``tensors`` needs on disk: the weights, ``optimizer_slots``
    optimizer tensors of the same size each (AdamW: 2), plus ``overhead`` for the JSON parts."""
    n = sum(int(t.numel()) * t.element_size() for t in tensors.values())
    return n * (1 + int(optimizer_slots)) + int(overhead)


def write_probe(directory: str | os.PathLike, min_free_bytes: int | None = None) -> Path:
    """Check that ``directory`` is writable before long work starts.

    Creates the directory if needed, writes, fsyncs and deletes a small probe file.
    With ``min_free_bytes`` (e.g. :func:`estimate_checkpoint_bytes`), it also checks that
    this much space is free and reserves it in the probe file (``posix_fallocate``, where
    the file system supports it: quotas count too), so a disk that could not take the
    first checkpoint fails now, not after the first hours of training. Raises
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
    need = None if min_free_bytes is None else int(min_free_bytes)

    def full(free: int | None) -> CheckpointError:
        have = f"only {_fmt_bytes(free)} free" if free is not None else "not enough space"
        return CheckpointError(f"disk full: output directory {directory} has {have}, "
                               f"need at least {_fmt_bytes(need)}")

    if need is not None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError as exc:
            raise CheckpointError(f"cannot query free space of {directory}: {describe_os_error(exc)}") from exc
        if free < need:
            raise full(free)

    probe = directory / f".adapterkit-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd: int | None = None
    try:
        fd = os.open(str(probe), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        payload = b"adapterkit write probe\n" * 8
        written = os.write(fd, payload)
        if written != len(payload):
            raise OSError(errno.ENOSPC, "short write")
        if need is not None and need > len(payload) and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, need)
            except OSError as exc:
                if exc.errno in _ENOSPC_CODES or exc.errno == errno.EFBIG:
                    raise full(None) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                    raise
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointError(f"output directory {directory} is not writable: {describe_os_error(exc)}") from exc
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quiet(probe)
    return directory


# ----------------------------------------------------------------------------- safetensors

#: bytes per element of every safetensors dtype torch can hold
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "C64": 8}
_TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64"}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                   ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0")):
    if hasattr(torch, _name):
        _TORCH_TO_ST[getattr(torch, _name)] = _st


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and data bytes, in name order: the
    checksum :func:`save_safetensors_atomic` records and :func:`load_safetensors_checked`
    verifies (independent of the file's layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8") + b"\0")
        if t.numel():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


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
    """Save ``tensors`` to a safetensors file atomically (temp file, fsync, rename), with
    their :func:`tensors_sha256` in the metadata (every reader verifies it)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(
                f"cannot save {path}: safetensors metadata must map str to str, got {k!r}: {type(v).__name__}"
            )
        if k == CHECKSUM_KEY:
            raise CheckpointError(f"cannot save {path}: the metadata key {CHECKSUM_KEY!r} is reserved")
        meta[k] = v
    prepared = _prepare_tensors(tensors, path)
    meta[CHECKSUM_KEY] = tensors_sha256(prepared)
    parent = _ensure_parent(path)
    tmp: Path | None = None
    try:
        fd, tmp = _create_temp(parent, path.name)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask
        os.close(fd)
        save_file(prepared, str(tmp), metadata=meta)  # it writes a new file of mode 0o600
        os.chmod(tmp, mode)
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse and validate a safetensors header; returns (header, header_len, file_size).

    Every entry is checked before anything is allocated from it: dtype known, shape a
    list of non-negative integers, ``data_offsets`` two integers inside the data area
    whose span equals the shape's size; ``__metadata__`` maps strings to strings."""
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
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{bad}: it is corrupt or not a safetensors file (bad header length)")
                raise CheckpointError(
                    f"{bad}: it is truncated (header needs {n} bytes, file has {size - 8} after the length)"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{bad}: its header is larger than {_fmt_bytes(MAX_HEADER_BYTES)}")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {describe_os_error(exc)}") from exc
    try:
        header = loads_json(raw, what="the header", error=CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{bad}: the header is corrupt or it is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: the header is corrupt or it is not a safetensors file (not a JSON object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in info.items()):
                raise CheckpointError(f"{bad}: its __metadata__ must map strings to strings")
            continue
        entry = f"{bad}: the header entry for {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{entry} is corrupt (not an object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise CheckpointError(f"{entry} has an unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{entry} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{entry} has invalid data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise CheckpointError(
                f"{bad}: it is truncated or corrupt ({name!r} ends at byte {8 + n + offsets[1]}, file has {size})"
            )
        if math.prod(shape) * _ST_ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise CheckpointError(f"{entry} is corrupt: shape {shape} {dtype} does not fit its "
                                  f"{offsets[1] - offsets[0]} bytes")
    return header, n, size


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file (empty if none, without the
    library's own checksum entry); checks the header."""
    header, _, _ = _read_header(Path(path))
    meta = header.get("__metadata__") or {}
    return {k: v for k, v in meta.items() if k != CHECKSUM_KEY}


def read_safetensors_index(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` of a safetensors file, from its validated
    header (no tensor data is read)."""
    header, _, _ = _read_header(Path(path))
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


ExpectedTensors = Mapping[str, "torch.Tensor | tuple[tuple[int, ...], torch.dtype]"]


def _check_expected(path: Path, header: dict[str, Any], expected: ExpectedTensors) -> None:
    names = [k for k in header if k != "__metadata__"]
    missing = [k for k in expected if k not in header or k == "__metadata__"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path} is missing key {missing[0]!r}{more}: it holds {len(names)} of the "
                              f"{len(expected)} expected tensors")
    unexpected = [k for k in names if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path} has key {unexpected[0]!r}, which the model does not have")
    for k, want in expected.items():
        shape, dtype = (tuple(want.shape), want.dtype) if isinstance(want, torch.Tensor) else want
        got_shape, got_dtype = tuple(header[k]["shape"]), header[k]["dtype"]
        if got_shape != tuple(shape):
            raise CheckpointError(f"{path}: shape mismatch for {k!r}: file has {got_shape}, model has {tuple(shape)}")
        if _TORCH_TO_ST.get(dtype) != got_dtype:
            raise CheckpointError(f"{path}: dtype mismatch for {k!r}: file has {got_dtype}, model has {dtype}")


def load_safetensors_checked(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    expected: ExpectedTensors | None = None,
    require_checksum: bool = False,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU, raising one clear :class:`CheckpointError` naming
    the file when it is missing, truncated, corrupt, not safetensors, fails the tensor
    checksum it was written with, or (when given) does not match ``expected_sha256``
    (of the whole file) or ``expected`` (name -> tensor or (shape, dtype): the same keys,
    shapes and dtypes, checked from the header before loading). A file without a checksum
    (written by another tool) loads, with a log note, unless ``require_checksum``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header, _, _ = _read_header(path)
    if expected is not None:
        _check_expected(path, header, expected)
    recorded = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if recorded is None:
        if require_checksum:
            raise CheckpointError(f"{path} has no adapterkit checksum: it was not written by this library "
                                  "or was rewritten since")
        logger.info("%s has no adapterkit checksum (written by another tool?): loaded without verifying it", path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path} is corrupt: sha256 {actual[:12]}... does not match the recorded {expected_sha256[:12]}..."
            )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file: it is truncated, corrupt or in another format ({exc})"
        ) from exc
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum recorded when it "
                              "was written (a flipped bit, or a file edited since)")
    return tensors


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
