"""Tests for adapterkit.safeio: atomic writes, checked safetensors, safe legacy loading."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import torch

from adapterkit import safeio
from adapterkit.errors import CheckpointError
from adapterkit.safeio import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_legacy_weights,
    load_safetensors_checked,
    load_weights,
    read_safetensors_metadata,
    remove_stale_temps,
    save_safetensors_atomic,
    sha256_file,
    write_probe,
)


def _no_temp_leftovers(directory: Path) -> bool:
    return not any(p.name.startswith(".") for p in directory.iterdir())


# ----------------------------------------------------------------------------- atomic files


def test_atomic_write_roundtrip_and_no_leftovers(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01abc")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5, None]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01abc"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5, None]}
    # overwrite keeps atomic semantics
    atomic_write_text(tmp_path / "sub" / "b.txt", "new")
    assert (tmp_path / "sub" / "b.txt").read_text() == "new"
    assert _no_temp_leftovers(tmp_path) and _no_temp_leftovers(tmp_path / "sub")


def test_atomic_write_json_rejects_nan_and_keeps_old(tmp_path):
    target = tmp_path / "c.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(CheckpointError, match="c.json"):
        atomic_write_json(target, {"bad": float("nan")})
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _no_temp_leftovers(tmp_path)


def test_atomic_write_disk_full_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safeio.os, "fsync", full_fsync)
    with pytest.raises(CheckpointError, match="disk full"):
        atomic_write_text(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _no_temp_leftovers(tmp_path)


# ----------------------------------------------------------------------------- atomic_dir


def _make_old(tmp_path: Path) -> Path:
    final = tmp_path / "out" / "model"
    with atomic_dir(final) as d:
        (d / "weights.txt").write_text("old")
        (d / "nested").mkdir()
        (d / "nested" / "x.txt").write_text("x")
    return final


def test_atomic_dir_success_replaces_existing(tmp_path):
    final = _make_old(tmp_path)
    assert (final / "weights.txt").read_text() == "old"
    with atomic_dir(final) as d:
        assert d != final and d.parent == final.parent
        (d / "weights.txt").write_text("new")
    assert (final / "weights.txt").read_text() == "new"
    assert not (final / "nested").exists()  # fully replaced, not merged
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


def test_atomic_dir_failure_midway_keeps_old_and_no_partial(tmp_path):
    final = _make_old(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as d:
            (d / "weights.txt").write_text("half")
            raise RuntimeError("boom")
    assert (final / "weights.txt").read_text() == "old"
    assert (final / "nested" / "x.txt").read_text() == "x"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]

    # fresh target: failure leaves nothing at all
    fresh = tmp_path / "out" / "other"
    with pytest.raises(ValueError):
        with atomic_dir(fresh) as d:
            (d / "a").write_text("a")
            raise ValueError("x")
    assert not fresh.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


def test_atomic_dir_rename_failure_restores_old(tmp_path, monkeypatch):
    final = _make_old(tmp_path)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # 1st: old aside, 2nd: new into place -> fail
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(safeio.os, "rename", flaky_rename)
    with pytest.raises(CheckpointError, match="disk full"):
        with atomic_dir(final) as d:
            (d / "weights.txt").write_text("new")
    monkeypatch.undo()
    assert (final / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


def test_crash_between_renames_is_recovered(tmp_path):
    final = _make_old(tmp_path)
    # simulate a crash after moving the old dir aside, with a half-built temp dir
    aside = final.parent / ".model.old-deadbeef"
    os.rename(final, aside)
    half = final.parent / ".model.tmp-cafebabe"
    half.mkdir()
    (half / "weights.txt").write_text("partial")
    removed = remove_stale_temps(final.parent)
    assert half in removed
    assert (final / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_roundtrip_shared_and_noncontiguous(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w": base,
        "w_t": base.t(),  # non-contiguous view sharing storage
        "row": base[1],  # slice sharing storage
        "same": base,  # the same tensor twice
        "p": torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    path = save_safetensors_atomic(tensors, tmp_path / "m.safetensors", metadata={"step": "7"})
    loaded = load_safetensors_checked(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v.detach()), k
    assert read_safetensors_metadata(path) == {"step": "7"}
    assert _no_temp_leftovers(tmp_path)


def test_save_safetensors_rejects_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="'w' is a list"):
        save_safetensors_atomic({"w": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="metadata"):
        save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"a": 1})
    assert not (tmp_path / "x.safetensors").exists()


def test_load_safetensors_missing_truncated_corrupt(tmp_path):
    path = save_safetensors_atomic({"w": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    good = path.read_bytes()

    with pytest.raises(CheckpointError, match="not found.*nope.safetensors"):
        load_safetensors_checked(tmp_path / "nope.safetensors")

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*truncated"):
        load_safetensors_checked(trunc)

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(good[:5])
    with pytest.raises(CheckpointError, match="tiny.safetensors.*truncated"):
        load_safetensors_checked(tiny)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_safetensors_checked(garbage)

    badjson = tmp_path / "badjson.safetensors"
    badjson.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\x00" * 16)
    with pytest.raises(CheckpointError, match="badjson.safetensors.*header is corrupt"):
        load_safetensors_checked(badjson)

    flipped = tmp_path / "flip.safetensors"
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flip.safetensors is corrupt: sha256"):
        load_safetensors_checked(flipped, expected_sha256=sha256_file(path))
    assert torch.equal(load_safetensors_checked(path, expected_sha256=sha256_file(path))["w"],
                       load_weights(path)["w"])


def test_sha256_file(tmp_path):
    import hashlib

    data = os.urandom(3 * 1024 + 17)
    p = tmp_path / "d"
    p.write_bytes(data)
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="missing"):
        sha256_file(tmp_path / "missing")


# ----------------------------------------------------------------------------- legacy pickles


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_crafted_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"weight": torch.ones(2), "x": _Evil(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.bin.*not plain tensors"):
        load_legacy_weights(path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_weights(path)
    assert not marker.exists()


def test_legacy_weights_ok_wrapped_and_errors(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "w.pt")
    got = load_legacy_weights(tmp_path / "w.pt")
    assert set(got) == {"a", "b"} and all(torch.equal(got[k], sd[k]) for k in sd)

    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    assert set(load_legacy_weights(tmp_path / "wrapped.pth")) == {"a", "b"}

    torch.save({"a": torch.ones(1), "n": 3}, tmp_path / "mixed.bin")
    with pytest.raises(CheckpointError, match="non-tensor entries.*'n'"):
        load_legacy_weights(tmp_path / "mixed.bin")

    raw = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[:60])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_legacy_weights(tmp_path / "trunc.pt")

    with pytest.raises(CheckpointError, match="not found"):
        load_legacy_weights(tmp_path / "nope.bin")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(CheckpointError, match="must end in"):
        load_legacy_weights(tmp_path / "w.txt")


# ----------------------------------------------------------------------------- write_probe


def test_write_probe_creates_dir_and_leaves_nothing(tmp_path):
    d = tmp_path / "a" / "b"
    assert write_probe(d) == d
    assert d.is_dir() and list(d.iterdir()) == []


def test_write_probe_path_under_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="afile"):
        write_probe(f / "sub")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        write_probe(f)


def test_write_probe_read_only_dir(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
        try:
            with pytest.raises(CheckpointError, match=r"ro is not writable: permission denied"):
                write_probe(d)
        finally:
            d.chmod(0o700)
    # root bypasses permission bits: simulate the kernel's answers instead
    real_open = os.open

    def make_fake(code: int, text: str):
        def fake_open(path, flags, *args, **kwargs):
            if "write-probe" in str(path):
                raise OSError(code, text, str(path))
            return real_open(path, flags, *args, **kwargs)

        return fake_open

    cases = [
        (errno.EROFS, "Read-only file system", "read-only file system"),
        (errno.EACCES, "Permission denied", "permission denied"),
        (errno.ENOSPC, "No space left on device", "disk full"),
    ]
    for code, text, expected in cases:
        monkeypatch.setattr(safeio.os, "open", make_fake(code, text))
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(d))}.*{expected}"):
            write_probe(d)
        monkeypatch.undo()
    assert list(d.iterdir()) == []


def test_write_probe_min_free_bytes(tmp_path):
    write_probe(tmp_path, min_free_bytes=1)
    with pytest.raises(CheckpointError, match="disk full.*need at least"):
        write_probe(tmp_path, min_free_bytes=1 << 62)


# ----------------------------------------------------------------------------- checksums


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def test_every_written_file_has_a_checksum_that_reads_verify(tmp_path):
    from safetensors.torch import load_file, save_file

    t = {"a": torch.randn(8, 8), "b": torch.arange(5)}
    path = save_safetensors_atomic(t, tmp_path / "m.safetensors")
    assert safeio.CHECKSUM_KEY not in read_safetensors_metadata(path)  # internal: not the caller's metadata
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one bit of the data area: a weight changes, the file is still valid safetensors
    path.write_bytes(bytes(raw))
    flipped = load_file(path)
    assert not all(torch.equal(flipped[k], t[k]) for k in t)
    with pytest.raises(CheckpointError, match="m.safetensors is corrupt: its tensors do not match the checksum"):
        load_safetensors_checked(path)
    # rewritten by another tool with a subset of the keys: no checksum, so the expected keys decide
    save_file({"a": t["a"]}, tmp_path / "subset.safetensors")
    assert set(load_safetensors_checked(tmp_path / "subset.safetensors")) == {"a"}
    with pytest.raises(CheckpointError, match=r"subset.safetensors is missing key 'b'.*1 of the 2 expected"):
        load_safetensors_checked(tmp_path / "subset.safetensors", expected=t)
    with pytest.raises(CheckpointError, match="no adapterkit checksum"):
        load_safetensors_checked(tmp_path / "subset.safetensors", require_checksum=True)
    good = save_safetensors_atomic(t, tmp_path / "good.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'a'"):
        load_safetensors_checked(good, expected={"a": ((8, 9), torch.float32), "b": t["b"]})
    with pytest.raises(CheckpointError, match=r"dtype mismatch for 'b'"):
        load_safetensors_checked(good, expected={"a": t["a"], "b": t["b"].int()})
    with pytest.raises(CheckpointError, match="has key 'b', which the model does not have"):
        load_safetensors_checked(good, expected={"a": t["a"]})
    assert torch.equal(load_safetensors_checked(good, expected=t, require_checksum=True)["a"], t["a"])
    with pytest.raises(CheckpointError, match="reserved"):
        save_safetensors_atomic(t, tmp_path / "x.safetensors", metadata={safeio.CHECKSUM_KEY: "0"})


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e999]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": [1]}, b"\0" * 8,
     "__metadata__ must map strings to strings"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"a": 1}}, b"\0" * 8,
     "__metadata__ must map strings to strings"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, b"\0" * 8, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fit"),
    ({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8, "truncated or corrupt"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"w": [1, 2]}, b"", "corrupt"),
])
def test_crafted_headers_are_refused_before_allocating(tmp_path, header, data, match):
    p = tmp_path / "crafted.safetensors"
    p.write_bytes(_raw_safetensors(header, data))
    with pytest.raises(CheckpointError, match="crafted.safetensors.*" + match):
        load_safetensors_checked(p)
    with pytest.raises(CheckpointError):
        read_safetensors_metadata(p)


def test_header_nesting_and_duplicate_keys(tmp_path):
    p = tmp_path / "deep.safetensors"
    p.write_bytes((20002).to_bytes(8, "little") + b"[" * 10001 + b"]" * 10001)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_safetensors_checked(p)
    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match='key "w" twice'):
        load_safetensors_checked(p)


def test_empty_weights_file_is_refused(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="e.safetensors.*truncated"):
        load_safetensors_checked(tmp_path / "e.safetensors")


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        a = atomic_write_text(tmp_path / "a.txt", "x")
        b = save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == mode
    assert stat.S_IMODE(b.stat().st_mode) == mode


def test_atomic_write_does_not_follow_a_planted_temp_symlink(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    names = iter(["fixed", "fixed", "other"])

    class FakeUUID:
        def __init__(self):
            self.hex = next(names).ljust(12, "0")

    monkeypatch.setattr(safeio.uuid, "uuid4", FakeUUID)
    (tmp_path / ".t.txt.fixed000000.tmp").symlink_to(victim)
    atomic_write_text(tmp_path / "t.txt", "new")
    assert victim.read_text() == "keep" and (tmp_path / "t.txt").read_text() == "new"


# ----------------------------------------------------------------------------- write probe size


def test_write_probe_reserves_the_needed_space(tmp_path, monkeypatch):
    calls = []
    real = os.posix_fallocate

    def fake_fallocate(fd, offset, length):
        calls.append(length)
        if length > 10 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(safeio.os, "posix_fallocate", fake_fallocate)
    write_probe(tmp_path, min_free_bytes=1 << 20)
    assert calls == [1 << 20] and list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match=r"disk full: output directory .* need at least 20.0 MiB"):
        write_probe(tmp_path, min_free_bytes=20 << 20)
    assert list(tmp_path.iterdir()) == []
    est = safeio.estimate_checkpoint_bytes({"w": torch.zeros(1000, dtype=torch.float32)})
    assert est == 4000 * 3 + (1 << 20)


# ----------------------------------------------------------------------------- safe JSON / YAML


def test_safe_loaders():
    from adapterkit.errors import ConfigError, DataError

    with pytest.raises(DataError, match="doc is nested too deeply"):
        safeio.loads_json("[" * 100000 + "]" * 100000, what="doc", error=DataError)
    with pytest.raises(DataError, match="doc is nested too deeply"):
        safeio.loads_json("[" * 65 + "]" * 65, what="doc", error=DataError)
    assert safeio.loads_json("[" * 64 + "]" * 64, what="doc") is not None
    with pytest.raises(ConfigError, match='doc has the key "a" twice'):
        safeio.loads_json('{"a": 1, "a": 2}', what="doc", error=ConfigError)
    assert safeio.loads_json('{"a": 1, "a": 2}', what="doc", reject_duplicates=False) == {"a": 2}
    with pytest.raises(CheckpointError, match="doc is not valid JSON"):
        safeio.loads_json("1" * 5000, what="doc")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        safeio.loads_json(b"\xff", what="doc")
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(ConfigError, match="expands to more than"):
        safeio.loads_yaml(bomb, what="doc")
    assert safeio.loads_yaml("a: &x [1, 2]\nb: *x\n", what="doc") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(ConfigError, match='line 2: the key "a" is given twice'):
        safeio.loads_yaml("a: 1\na: 2\n", what="doc")
    with pytest.raises(ConfigError, match="nested too deeply"):
        safeio.loads_yaml("[" * 3000 + "]" * 3000, what="doc")
    with pytest.raises(ConfigError, match="not valid YAML"):
        safeio.loads_yaml("a: [", what="doc")
