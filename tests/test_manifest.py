"""Atomic writes and manifests: nothing half written, every file hashed."""
from __future__ import annotations

import hashlib
import json

import pytest

from quantprism.manifest import atomic_path, write_manifest


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_manifest_hashes_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_text("{}")
    m = write_manifest(tmp_path, settings={"grid": "q4_k"})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == m and m["settings"] == {"grid": "q4_k"}
    assert m["files"]["a.safetensors"] == {"sha256": hashlib.sha256(b"abc").hexdigest(), "bytes": 3}
    assert set(m["files"]) == {"a.safetensors", "sub/b.json"}
