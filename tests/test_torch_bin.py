"""Reading `torch.save` files without torch, checked against files and values torch wrote.

tests/fixtures/torch_bin/ was produced by real PyTorch (see make_fixture.py there); expected.npz
holds torch's own `.numpy()` of every tensor, so these tests compare against torch's view.
"""

import os
import shutil
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from magi_jax.formats.checkpoint_dir import ShardedCheckpoint
from magi_jax.formats.safetensors_io import CheckpointFormatError
from magi_jax.official.t5 import load_t5
from magi_jax.formats.torch_bin import TorchBinFile

HERE = os.path.join(FIXTURES, "torch_bin")
MODEL_BIN = os.path.join(HERE, "model.bin")
T5_BIN_DIR = os.path.join(HERE, "t5_tiny_bin")
T5_ST_DIR = os.path.join(FIXTURES, "text", "t5_tiny")

TORCH_TO_NUMPY = {
    "torch.float32": np.float32, "torch.float16": np.float16, "torch.float64": np.float64,
    "torch.bfloat16": ml_dtypes.bfloat16, "torch.float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "torch.int64": np.int64, "torch.int32": np.int32, "torch.bool": np.bool_,
}


def _expected():
  with np.load(MODEL_BIN.replace("model.bin", "expected.npz")) as z:
    return {k: z[k] for k in z.files}


def test_every_tensor_matches_what_torch_reads():
  expected = _expected()
  names = sorted(k for k in expected if not k.startswith("dtype:"))
  f = TorchBinFile(MODEL_BIN)
  assert sorted(f.keys()) == names
  for key in names:
    want, torch_dtype = expected[key], str(expected["dtype:" + key])
    got = f.get(key)
    assert key in f
    assert f.shape(key) == want.shape == got.shape, key
    assert f.dtype(key) == np.dtype(TORCH_TO_NUMPY[torch_dtype]) == got.dtype, key
    if got.dtype != want.dtype:                       # bf16 / fp8: torch upcast to float32
      got = got.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=key)
    assert got.tobytes() == want.tobytes(), key       # bit-identical, signed zeros included


def test_strided_and_shared_storage_tensors():
  f, expected = TorchBinFile(MODEL_BIN), _expected()
  t = f.get("transposed")
  assert t.shape == (6, 4) and t.flags.c_contiguous
  np.testing.assert_array_equal(t, expected["transposed"])
  # Both slices come from one 8x5 storage (values 0.5 * i - 3): rows 2:4, and rows 5: cols 1:4.
  big = np.arange(40, dtype=np.float32).reshape(8, 5) * 0.5 - 3.0
  np.testing.assert_array_equal(f.get("slice_rows"), big[2:4])
  np.testing.assert_array_equal(f.get("slice_block"), big[5:, 1:4])
  assert f.shape("scalar") == () and f.get("scalar") == np.float32(2.5)
  assert f.get("empty").shape == (0, 3)
  assert not f.get("f32").flags.writeable            # a view of the read-only mmap


def test_t5_bin_directory_loads_like_the_safetensors_one():
  ckpt = ShardedCheckpoint(T5_BIN_DIR)
  assert "encoder.embed_tokens.weight" in ckpt       # the tied copy, one storage with shared
  np.testing.assert_array_equal(ckpt.get("encoder.embed_tokens.weight"), ckpt.get("shared.weight"))
  from_bin, from_st = load_t5(T5_BIN_DIR), load_t5(T5_ST_DIR)
  a = jax.tree_util.tree_leaves(nnx.state(from_bin, nnx.Param))
  b = jax.tree_util.tree_leaves(nnx.state(from_st, nnx.Param))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.dtype == y.dtype == np.float32
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  ids = np.array([[5, 17, 33, 1, 0, 0], [8, 2, 1, 0, 0, 0]])
  mask = (ids != 0).astype(np.int32)
  np.testing.assert_array_equal(from_bin(ids, mask), from_st(ids, mask))


def test_single_pytorch_model_bin_directory(tmp_path):
  shutil.copy(MODEL_BIN, tmp_path / "pytorch_model.bin")
  ckpt = ShardedCheckpoint(str(tmp_path))
  assert sorted(ckpt.keys()) == sorted(TorchBinFile(MODEL_BIN).keys())
  assert ckpt.shape("slice_block") == (3, 3)


def _zip_with_pickle(path, pkl: bytes):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval")])
def test_forbidden_globals_are_refused_and_not_run(tmp_path, module, name):
  marker = tmp_path / "pwned"
  payload = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
  # Protocol 2 by hand: GLOBAL module name, the argument, TUPLE1, REDUCE, STOP.
  pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + _s(payload) + b"\x85R."
  path = tmp_path / "evil.bin"
  _zip_with_pickle(path, pkl)
  with pytest.raises(CheckpointFormatError, match=f"{module}.{name}") as e:
    TorchBinFile(str(path))
  assert str(path) in str(e.value)
  assert not marker.exists()


def test_forbidden_global_inside_a_state_dict(tmp_path):
  with zipfile.ZipFile(MODEL_BIN) as z:
    pkl = z.read("model/data.pkl")
  evil = pkl.replace(b"collections\nOrderedDict\n", b"subprocess\nPopen\n")
  assert evil != pkl
  path = tmp_path / "evil.bin"
  _zip_with_pickle(path, evil)
  with pytest.raises(CheckpointFormatError, match="subprocess.Popen"):
    TorchBinFile(str(path))


def _s(text: str) -> bytes:            # BINUNICODE
  return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def test_a_pickle_cannot_rewrite_a_checked_tensor(tmp_path):
  # {'x': _rebuild_tensor_v2(<1-float storage>, 0, (1,), (1,), False, {})}, then BUILD on that
  # tensor with {'offset': 2**30}: must not lead `get` to read outside the storage.
  pkl = (b"\x80\x02}" + _s("x") + b"ctorch._utils\n_rebuild_tensor_v2\n(("
         + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"K\x01tQ"
         + b"K\x00K\x01\x85K\x01\x85\x89}tR" + b"}" + _s("offset") + b"J\x00\x00\x00\x40sb" + b"s.")
  path = tmp_path / "build.bin"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("a/data.pkl", pkl)
    z.writestr("a/data/0", np.float32(1).tobytes())
  with pytest.raises(CheckpointFormatError, match="set the state of a LazyTensor"):
    TorchBinFile(str(path))
  ok = tmp_path / "ok.bin"                 # the same file without the BUILD reads fine
  with zipfile.ZipFile(ok, "w") as z:
    z.writestr("a/data.pkl", pkl.replace(b"}" + _s("offset") + b"J\x00\x00\x00\x40sb", b""))
    z.writestr("a/data/0", np.float32(1).tobytes())
  np.testing.assert_array_equal(TorchBinFile(str(ok)).get("x"), [1.0])
  listed = tmp_path / "list.bin"
  _zip_with_pickle(listed, b"\x80\x02]q\x00.")
  with pytest.raises(CheckpointFormatError, match="holds a list, not a state dict"):
    TorchBinFile(str(listed))


def test_corrupt_truncated_and_legacy_files_fail_clearly(tmp_path):
  data = open(MODEL_BIN, "rb").read()
  cut = tmp_path / "cut.bin"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointFormatError, match="truncated or corrupt zip") as e:
    TorchBinFile(str(cut))
  assert str(cut) in str(e.value)
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"x" * 100)
  with pytest.raises(CheckpointFormatError, match="junk.bin: not a zip-based torch.save"):
    TorchBinFile(str(junk))
  legacy = tmp_path / "legacy.bin"      # the pre-1.6 format starts with a pickled magic number
  legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.")
  with pytest.raises(CheckpointFormatError, match="legacy.*torch>=1.6.*safetensors"):
    TorchBinFile(str(legacy))
  with pytest.raises(CheckpointFormatError, match="not found"):
    TorchBinFile(str(tmp_path / "missing.bin"))
  # A storage member missing, or shorter than its tensors need.
  for mode in ("drop", "short"):
    bad = tmp_path / f"{mode}.bin"
    with zipfile.ZipFile(MODEL_BIN) as src, zipfile.ZipFile(bad, "w") as dst:
      for info in src.infolist():
        body = src.read(info)
        if info.filename == "model/data/0":
          if mode == "drop":
            continue
          body = body[:-4]
        dst.writestr(info, body)
    with pytest.raises(CheckpointFormatError, match="missing" if mode == "drop" else "truncated"):
      TorchBinFile(str(bad))
  garbage_pkl = tmp_path / "pkl.bin"
  _zip_with_pickle(garbage_pkl, b"\x80\x02}q\x00(X")
  with pytest.raises(CheckpointFormatError, match="pkl.bin: corrupt or unsupported data.pkl"):
    TorchBinFile(str(garbage_pkl))


def test_a_deflated_archive_is_read_too(tmp_path):
  path = tmp_path / "deflated.bin"
  with zipfile.ZipFile(MODEL_BIN) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
      dst.writestr(info.filename, src.read(info))
  f, expected = TorchBinFile(str(path)), _expected()
  np.testing.assert_array_equal(f.get("slice_block"), expected["slice_block"])
  np.testing.assert_array_equal(f.get("transposed"), expected["transposed"])


def test_bin_shards_without_index_and_index_errors(tmp_path):
  for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
    shutil.copy(os.path.join(T5_BIN_DIR, name), tmp_path / name)
  with pytest.raises(CheckpointFormatError, match="no pytorch_model.bin.index.json"):
    ShardedCheckpoint(str(tmp_path))
  (tmp_path / "pytorch_model.bin.index.json").write_text("{not json")
  with pytest.raises(CheckpointFormatError, match="not a valid weight index"):
    ShardedCheckpoint(str(tmp_path))
  (tmp_path / "pytorch_model.bin.index.json").write_text(
      '{"weight_map": {"shared.weight": "pytorch_model-00001-of-00002.bin"}}')
  with pytest.raises(CheckpointFormatError, match="the index says it holds 'shared.weight'"):
    ShardedCheckpoint(str(tmp_path)).get("shared.weight")


def test_big_endian_archive(tmp_path):
  # torch writes `byteorder` = 'big' on big-endian hosts; emulate one by swapping every storage.
  f = TorchBinFile(MODEL_BIN)
  dtype_of = {f._tensors[k].storage.key: f.dtype(k) for k in f.keys()}
  path = tmp_path / "big_endian.bin"
  with zipfile.ZipFile(MODEL_BIN) as src, zipfile.ZipFile(path, "w") as dst:
    for info in src.infolist():
      body = src.read(info)
      if info.filename == "model/byteorder":
        body = b"big"
      elif info.filename.startswith("model/data/"):
        dt = dtype_of[info.filename.rsplit("/", 1)[1]]
        part = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize
        body = np.frombuffer(body, f"u{part}").byteswap().tobytes()
      dst.writestr(info, body)
  big, expected = TorchBinFile(str(path)), _expected()
  for key in big.keys():
    got = big.get(key)
    assert got.dtype == f.dtype(key) and got.dtype.isnative
    np.testing.assert_array_equal(got.astype(expected[key].dtype), expected[key], err_msg=key)
