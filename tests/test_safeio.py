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
