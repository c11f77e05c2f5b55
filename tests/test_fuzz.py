"""Fuzzing hostile input (issue 20) with hypothesis: the targets.toml parser, the safetensors header reader, the
GGUF structure check `validate` runs first, and the calibration readers. Property: the reader returns, or raises
the tool's own one-line error (exit 2 at the CLI) — never another exception. A sample of each family also goes
through the CLI in-process: exit 2, one line on stderr, no traceback, nothing written.

QUANTPRISM_FUZZ_EXAMPLES sets the examples per family (default 150; CI runs the default)."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantprism.errors import ArtifactError, CalibrationError, ConfigError, ModelError

from conftest import assert_one_line_error

N = int(os.environ.get("QUANTPRISM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(os.environ.get("QP_LLAMA_CPP", Path.home() / ".cache" / "quantprism" / "llama.cpp"))

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)


def _flip(data: bytes, flips: list[tuple[int, int]], limit: int | None = None) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % (limit or len(b))] = val
    return bytes(b)


# targets.toml -----------------------------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None and not isinstance(x, dict)) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"


REAL_TARGETS = (ROOT / "targets.toml").read_text(encoding="utf-8")
KEYS = sorted({ln.split("=")[0].strip() for ln in REAL_TARGETS.splitlines() if "=" in ln and not ln.startswith("#")})


@st.composite
def targets_files(draw) -> bytes:
    kind = draw(st.sampled_from(["edit", "flip", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=400))
    if kind == "flip":
        return _flip(REAL_TARGETS.encode(), draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                          min_size=1, max_size=6)))
    lines = REAL_TARGETS.splitlines()
    for _ in range(draw(st.integers(1, 4))):  # a known key gets a value of any type, or a line goes, or a table
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "drop", "table", "key"]))
        if op == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + _toml_value(draw(json_values.filter(lambda v: v is not None)))
        elif op == "drop":
            del lines[i]
        elif op == "table":
            lines.insert(i, "[" + draw(st.sampled_from(["target", "defaults", "target.x.gates", "hardware", "drift",
                                                         "target.\"a/b\"", "target.x"])) + "]")
        else:
            lines.insert(i, f"{draw(st.sampled_from(KEYS))} = {_toml_value(draw(json_values.filter(lambda v: v is not None)))}")
    return "\n".join(lines).encode()


@FUZZ
@given(data=targets_files())
def test_fuzz_targets_parser(tmp_path_factory, data):
    from quantprism.config import parse_targets

    d = tmp_path_factory.mktemp("toml")
    (d / "t.toml").write_bytes(data)
    try:
        parse_targets(d / "t.toml")
    except ConfigError as e:
        assert "\n" not in str(e) or str(e).count("\n") <= 1  # TOML decode errors quote one line
    assert sorted(p.name for p in d.iterdir()) == ["t.toml"]


# safetensors header -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_file(tmp_path_factory) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.float16)},
                metadata={"format": "pt"})


@st.composite
def st_mutations(draw, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    kind = draw(st.sampled_from(["flip", "truncate", "length", "header"]))
    if kind == "flip":
        return _flip(data, draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)),
                     limit=8 + n + 8)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    header = json.dumps(draw(json_values)).encode()
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path_factory, st_file, data):
    from quantprism.model.loader import _read_safetensors_header

    blob = data.draw(st_mutations(st_file))
    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    p.write_bytes(blob)
    try:
        header = _read_safetensors_header(p)
    except ModelError:
        return
    assert isinstance(header, dict)  # accepted: every tensor lies inside the file with its shape's byte count


# GGUF ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file() -> bytes:
    path = LLAMA_CPP / "models" / "ggml-vocab-phi-3.gguf"  # a real GGUF nobody here wrote (llama.cpp's test vocabulary)
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: `make install` fetches llama.cpp's source tree")
        pytest.skip("llama.cpp test vocabularies not installed (make install)")
    return path.read_bytes()


@st.composite
def gguf_mutations(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "counts", "string"]))
    if kind == "flip":  # the header and key-value area, where lengths and counts live
        return _flip(data, draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)),
                     limit=4096)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "counts":
        off = draw(st.sampled_from([8, 16]))
        return data[:off] + struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[off + 8:]
    return data[:24] + struct.pack("<Q", draw(st.integers(2**20, 2**64 - 1))) + data[32:]  # the first key's length


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_structure_check(tmp_path_factory, gguf_file, data):
    from quantprism.runtimes.llamacpp import check_gguf

    p = tmp_path_factory.mktemp("gguf") / "model.gguf"
    p.write_bytes(data.draw(gguf_mutations(gguf_file)))
    try:
        check_gguf(p)
    except ArtifactError:
        pass


# calibration readers ----------------------------------------------------------------------------------------------

@st.composite
def calibration_sources(draw, root: Path) -> Path:
    kind = draw(st.sampled_from(["txt", "jsonl", "dir", "jsonl-lines"]))
    junk = st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
    if kind == "dir":
        d = root / "cal"
        d.mkdir()
        for i in range(draw(st.integers(0, 3))):
            (d / f"{i}.{draw(st.sampled_from(['txt', 'bin']))}").write_bytes(draw(junk))
        return d
    p = root / f"cal.{'txt' if kind == 'txt' else 'jsonl'}"
    if kind == "jsonl-lines":
        lines = draw(st.lists(json_values.map(json.dumps) | st.just("[" * 5000) | st.just('{"text": "\\u0000 x"}'),
                              max_size=5))
        p.write_text("\n".join(lines), encoding="utf-8")
    else:
        p.write_bytes(draw(junk) + (b"\x00" * draw(st.integers(0, 3))) + (b"x" * draw(st.sampled_from([0, 10**6]))))
    return p


@FUZZ
@given(data=st.data())
def test_fuzz_calibration_readers(tmp_path_factory, data):
    from quantprism.calibration.sources import read_documents

    root = tmp_path_factory.mktemp("cal")
    src = data.draw(calibration_sources(root))
    try:
        docs = read_documents(src)
    except CalibrationError:
        return
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)


# the same families through the CLI ----------------------------------------------------------------------------------

def test_hostile_files_through_the_cli_are_one_line_exit_2(tmp_path, run_cli, st_file, gguf_file):
    """One deterministic example per family, end to end: exit 2, one line, no traceback, nothing written."""
    cases = []
    (tmp_path / "t.toml").write_bytes(REAL_TARGETS.encode().replace(b'quant = "Q4_K_M"', b"quant = [1, {}]", 1))
    cases.append((("targets", tmp_path / "t.toml"), "quant"))
    model = tmp_path / "model"
    shutil.copytree(ROOT / "src" / "quantprism" / "assets" / "reference-llama", model)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + st_file[8:])
    cases.append((("inspect", model), "not a safetensors file"))
    (tmp_path / "huge.gguf").write_bytes(gguf_file[:16] + struct.pack("<Q", 2**62) + gguf_file[24:4096])
    cases.append((("validate", tmp_path / "huge.gguf"), "malformed GGUF header"))
    (tmp_path / "cal.jsonl").write_text("[" * 5000 + "\n", encoding="utf-8")
    cases.append((("inspect", "builtin", "--calibration", tmp_path / "cal.jsonl"), "not valid JSON"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, needle in cases:
        rc, _, err = run_cli(*map(str, args))
        assert_one_line_error(rc, err, needle)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# `validate` end to end: mutated model GGUFs loaded in llama.cpp (in its child process) ------------------------------

N_VALIDATE = int(os.environ.get("QUANTPRISM_FUZZ_VALIDATE", "20"))  # each example is a child process (~2 s)


@pytest.fixture(scope="module")
def model_gguf(tiny_models, tmp_path_factory) -> tuple[bytes, int, list[str]]:
    """A real model GGUF (the tiny llama, F16: no canonical pass needed) that llama.cpp loads and runs; where its
    tensor data starts; its single-number metadata keys."""
    import gguf

    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(path, load_model_info(str(tiny_models["llama"])), None, "F16")
    r = gguf.GGUFReader(str(path))
    numeric = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32,
               gguf.GGUFValueType.UINT64)
    keys = sorted(k for k, f in r.fields.items() if f.types and f.types[0] in numeric and len(f.data) == 1)
    return path.read_bytes(), int(r.data_offset), keys


@pytest.mark.llamacpp
def test_a_well_formed_gguf_that_aborts_llama_cpp_is_one_line_from_validate(model_gguf, tmp_path, run_cli):
    """block_count 1000 in a structurally valid file: llama.cpp aborts natively (SIGABRT — in-process that kills
    the tool silently, exit 134); `validate` loads in a child process, so the user gets one line and exit 2."""
    import subprocess
    import sys

    import gguf

    path = tmp_path / "abort.gguf"
    path.write_bytes(model_gguf[0])
    f = gguf.GGUFReader(str(path), "r+").fields["llama.block_count"]
    f.parts[f.data[0]][0] = 1000
    del f
    raw = subprocess.run([sys.executable, "-c", "import sys; from quantprism.pipeline.commands import validate_artifact;"
                          " validate_artifact(sys.argv[1], 1)", str(path)], capture_output=True, text=True)
    assert raw.returncode == -6, raw.stderr[-500:]  # the failing case the child process is there for
    rc, _, err = run_cli("validate", path, "--threads", "1")
    assert_one_line_error(rc, err, "runtime process died (killed by SIGABRT)")


@pytest.mark.llamacpp
@settings(max_examples=N_VALIDATE, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_validate_on_mutated_model_ggufs(model_gguf, tmp_path_factory, run_cli, data):
    """A real model GGUF with a metadata value replaced, header bytes flipped, or cut short, through
    `quantprism validate`: it loads and runs (exit 0) or it is one line and exit 2 — never a traceback or a crash —
    and nothing is written."""
    tmp = tmp_path_factory.mktemp("val")
    blob, data_offset, keys = model_gguf
    kind = data.draw(st.sampled_from(["value", "flip", "truncate"]))
    path = tmp / "m.gguf"
    if kind == "value":
        import gguf

        path.write_bytes(blob)
        f = gguf.GGUFReader(str(path), "r+").fields[data.draw(st.sampled_from(keys))]
        part = f.parts[f.data[0]]
        big = int(np.iinfo(part.dtype).max) if part.dtype.kind in "iu" else 1e30
        part[0] = data.draw(st.sampled_from([0, 1, 3, 1000, big]))
        del f, part
    elif kind == "flip":  # the header, the metadata and the tensor records (the data follows them)
        flips = data.draw(st.lists(st.tuples(st.integers(0, data_offset), st.integers(0, 255)), min_size=1, max_size=4))
        path.write_bytes(_flip(blob, flips, data_offset))
    else:
        path.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1))])
    before = sorted(tmp.rglob("*"))
    rc, out, err = run_cli("validate", path, "--threads", "1")
    if rc != 0:
        assert_one_line_error(rc, err)
    assert sorted(tmp.rglob("*")) == before
