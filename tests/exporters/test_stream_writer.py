"""The streaming safetensors writer: what it writes loads back exactly, shards and indexes as Hugging Face does, is
deterministic, leaves nothing behind when interrupted, and holds one tensor at a time (peak RSS measured)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantprism import progress
from quantprism.errors import ArtifactError
from quantprism.exporters.hf_checkpoint import INDEX_FILE, SINGLE_FILE, write_hf_checkpoint, write_safetensors
from quantprism.exporters.safetensors_stream import ShardWriter, write_stream


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g),
        "layers.0.scales": torch.randn(3, 7, generator=g).half(),
        "layers.0.qweight": torch.randint(-2**31, 2**31 - 1, (5, 3), generator=g, dtype=torch.int32),
        "layers.0.g_idx": torch.arange(9, dtype=torch.int64),
        "layers.0.int8": torch.randint(-128, 127, (11,), generator=g, dtype=torch.int8),
        "layers.0.u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "layers.0.mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),  # 0-dim
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def files_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and tuple(got[k].shape) == tuple(v.shape), k
        assert torch.equal(got[k], v), k


def test_round_trip_names_dtypes_shapes_values(tmp_path):
    want = sample()
    assert write_stream(tmp_path, iter(want.items())) == [SINGLE_FILE]  # a generator: arrival order
    assert files_in(tmp_path) == [SINGLE_FILE]  # no temp files left, no index for one shard
    assert_same(load_file(str(tmp_path / SINGLE_FILE)), want)
    with safe_open(str(tmp_path / SINGLE_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b" ", b"}")
    header = json.loads(raw[8:8 + n])
    assert list(header)[0] == "__metadata__"
    for name, e in header.items():  # every tensor aligned to its element size (the data start is 8-aligned)
        if name != "__metadata__":
            assert e["data_offsets"][0] % want[name].element_size() == 0, name


def test_numpy_arrays_and_a_mapping_read_one_value_at_a_time(tmp_path):
    arrays = {"b": np.arange(12, dtype=np.uint32).reshape(3, 4), "a": np.linspace(0, 1, 5, dtype=np.float32)}
    reads: list[str] = []

    class Lazy(Mapping):
        def __getitem__(self, k):
            reads.append(k)
            return arrays[k]

        def __iter__(self):
            return iter(arrays)

        def __len__(self):
            return len(arrays)

    write_safetensors(tmp_path, Lazy())
    assert reads == ["a", "b"]  # sorted-name order, each value read once, when written
    got = load_file(str(tmp_path / SINGLE_FILE))
    assert got["b"].dtype == torch.uint32 and np.array_equal(got["b"].numpy(), arrays["b"])
    assert np.array_equal(got["a"].numpy(), arrays["a"])


def test_sharding_writes_an_index_covering_every_tensor(tmp_path):
    want = {f"t.{i:02d}": torch.full((100 + 10 * i,), float(i)) for i in range(12)}
    want["big"] = torch.zeros(1000)  # 4000 bytes > shard_bytes: a shard of its own
    shard_bytes = 1500
    files = write_stream(tmp_path, iter(want.items()), shard_bytes=shard_bytes)
    n = len(files)
    assert n > 3 and files == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert files_in(tmp_path) == sorted([*files, INDEX_FILE])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    got: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(tmp_path / f))
        assert all(index["weight_map"][k] == f for k in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= shard_bytes or len(part) == 1
        got.update(part)
    assert_same(got, want)
    assert load_file(str(tmp_path / index["weight_map"]["big"])).keys() == {"big"}


def test_same_tensors_give_identical_bytes(tmp_path):
    for d in ("a", "b"):
        write_stream(tmp_path / d, iter(sample().items()), shard_bytes=600)
    assert files_in(tmp_path / "a") == files_in(tmp_path / "b") and len(files_in(tmp_path / "a")) > 2
    for f in files_in(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def failing(n_ok: int):
    for i in range(n_ok):
        yield f"t.{i}", torch.full((256,), float(i))
    raise RuntimeError("packer failed")


def test_interrupted_write_leaves_no_file(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="packer failed"):
        write_stream(root, failing(10), shard_bytes=2048)  # several shards already finalized when it fails
    assert files_in(root) == []
    with pytest.raises(ArtifactError, match="written twice"):
        write_stream(root, [("x", torch.zeros(3)), ("x", torch.zeros(3))])
    with pytest.raises(ArtifactError, match="cannot store"):
        write_stream(root, [("x", torch.zeros(3)), ("c", torch.zeros(2, dtype=torch.complex64))])
    assert files_in(root) == []
    w = ShardWriter(root, shard_bytes=100)
    for i in range(3):
        w.add(f"t.{i}", torch.zeros(30))
    w.abort()
    assert files_in(root) == []


def test_interrupted_checkpoint_leaves_no_directory(tmp_path):
    from quantprism.model import load_model_info

    info = load_model_info(None)
    with pytest.raises(RuntimeError, match="packer failed"):
        write_hf_checkpoint(tmp_path / "ckpt", info, failing(10), {"quant_method": "gptq"}, shard_bytes=2048)
    assert files_in(tmp_path) == []
    out = write_hf_checkpoint(tmp_path / "ckpt", info, iter(sample().items()), {"quant_method": "gptq"}, shard_bytes=600)
    assert INDEX_FILE in files_in(out) and "config.json" in files_in(out)


class Recorder:
    def __init__(self):
        self.totals, self.done = [], 0.0

    def start(self, key, description, total, unit):
        self.totals.append((description, total, unit))

    def advance(self, key, n, note):
        self.done += n

    def finish(self, key):
        pass

    def set_total(self, key, total):
        pass


def test_progress_reports_the_bytes_written(tmp_path):
    rec = Recorder()
    with progress.reporting(rec):
        write_safetensors(tmp_path, iter(sample().items()), description="export x")
    assert rec.totals == [("export x", None, "B")]
    assert rec.done == sum(t.numel() * t.element_size() for t in sample().values())


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from quantprism.exporters.safetensors_stream import write_stream

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    N, NUMEL = 40, 2 * 1024 * 1024  # 40 tensors of 8 MiB: 320 MiB written

    def tensors():
        for i in range(N):
            yield f"layers.{i}.weight", torch.full((NUMEL,), float(i))

    torch.full((NUMEL,), 0.0)  # allocator warm-up
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    base = status("VmRSS")
    files = write_stream(Path(sys.argv[1]), tensors(), shard_bytes=int(sys.argv[2]))
    print(json.dumps({"growth": status("VmHWM") - base, "files": files}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_peak_memory_is_one_tensor_not_the_checkpoint(tmp_path):
    total = 40 * 8 * 2**20
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "out"), str(150 * 2**20)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["files"]) == 3  # 150 MiB shards: finalized while tensors keep arriving
    assert res["growth"] < 100 * 2**20, f"peak RSS grew by {res['growth'] / 2**20:.0f} MiB writing {total / 2**20:.0f} MiB"
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == total and len(index["weight_map"]) == 40
    with safe_open(str(tmp_path / "out" / index["weight_map"]["layers.39.weight"]), "pt") as f:
        t = f.get_tensor("layers.39.weight")
    assert t.shape == (2 * 2**20,) and float(t[0]) == float(t[-1]) == 39.0
