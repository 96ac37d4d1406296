"""isara.gguf.read_metadata against gguf-py's own GGUFReader: the same key/values, value types and tensor names.

    python -m pytest tests/test_gguf_metadata.py -q      # ~5 s
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from isara.base_models import base_model_path
from isara.gguf import _metadata_via_reader, read_metadata


def test_bundled_base_gguf_reads_as_gguf_py_reads_it():
    path = base_model_path("smollm2")  # tokens and merges (string arrays), token types (int32 array)
    fast = read_metadata(path)
    assert fast == _metadata_via_reader(path)
    assert len(fast.kv["tokenizer.ggml.tokens"]) == 49152 and len(fast.tensor_names) == 272


def test_every_value_type(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    T = gguf.GGUFValueType
    scalars = {"u8": (200, T.UINT8), "i8": (-5, T.INT8), "u16": (60000, T.UINT16), "i16": (-300, T.INT16),
               "u32": (4_000_000_000, T.UINT32), "i32": (-70000, T.INT32), "f32": (0.1, T.FLOAT32),
               "bool": (True, T.BOOL), "u64": (2**40, T.UINT64), "i64": (-2**40, T.INT64), "f64": (0.1, T.FLOAT64),
               "str": ("héllo", T.STRING)}
    for key, (value, vtype) in scalars.items():
        w.add_key_value(key, value, vtype)
    w.add_array("strs", ["a", "", "ü"])
    w.add_key_value("floats", [0.5, -1.25], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("bools", [True, False], T.ARRAY, sub_type=T.BOOL)
    w.add_tensor("blk.0.w", np.ones((2, 3), dtype=np.float32))
    w.add_tensor("out", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    fast = read_metadata(path)
    assert fast == _metadata_via_reader(path)
    assert fast.tensor_names == ["blk.0.w", "out"]
    assert fast.kv["f32"] == float(np.float32(0.1)) and fast.kv["f64"] == 0.1 and fast.kv["str"] == "héllo"
    assert fast.fields["strs"].sub_type == T.STRING and fast.kv["bools"] == [True, False]


def test_not_a_gguf_names_the_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 4)  # truncated after the version
    with pytest.raises(ValueError, match="model.gguf: not a readable GGUF"):
        read_metadata(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="model.gguf: not a readable GGUF file \\(empty\\)"):
        read_metadata(bad)
