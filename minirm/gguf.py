"""A small GGUF reader: header, metadata, tensor infos, and numpy dequantisation.

GGUF is llama.cpp's single-file checkpoint format (spec: ggml/docs/gguf.md). A file is

    magic b"GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor starts at data_start + offset

All integers are little-endian; a string is a u64 byte length followed by UTF-8 bytes. Dims are
listed innermost first (ne[0] is the row length), so dims [in, out] is a numpy array (out, in).

Simplifications: versions 2 and 3 only (version 1 used 32-bit counts), little-endian files only,
and four tensor types: F32, F16, Q8_0 and Q4_1, the ones SmolLM2's Q4_1 file uses. The file is
memory-mapped once; tensors are decoded on request, one at a time.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minirm.errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value types (spec: gguf_metadata_value_type) -> struct format of a scalar.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = (
    range(13))
_SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I",
                   INT32: "<i", FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q",
                   FLOAT64: "<d"}

# ggml tensor types by id (ggml.h, enum ggml_type); only some are decoded below.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8

# Block layouts (ggml-common.h). A block covers QK consecutive elements of one row.
QK = 32
_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", QK)])            # 34 bytes
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])  # 20 bytes
# type -> (elements per block, bytes per block)
_BLOCK_SIZES = {F32: (1, 4), F16: (1, 2), Q8_0: (QK, _Q8_0_BLOCK.itemsize),
                Q4_1: (QK, _Q4_1_BLOCK.itemsize)}


def type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


@dataclass
class TensorInfo:
    name: str
    dims: tuple      # as stored: innermost first
    type: int        # ggml type id
    offset: int      # bytes from the start of the data section

    @property
    def shape(self) -> tuple:
        """The numpy shape: dims reversed, so the row length comes last."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)  # Python ints: corrupt dims cannot overflow to a small size

    @property
    def n_bytes(self) -> int:
        block, block_bytes = _BLOCK_SIZES[self.type]
        return self.n_elements // block * block_bytes


class _Cursor:
    """Reads little-endian values from a byte buffer; running off the end is a truncated file."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        end = self.pos + n
        if end > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file: the header needs byte {end} but "
                            f"the file has {len(self.buf)} bytes; download it again")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == FLOAT32:
            # The shortest decimal that round-trips the float32 (1e-05, not 9.999999747e-06).
            return float(str(np.float32(self.scalar("<f"))))
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALAR_FORMATS and etype != BOOL:
                # Numeric arrays (token scores, token types) in one frombuffer, not a loop.
                dtype = np.dtype(_SCALAR_FORMATS[etype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        raise UserError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte "
                        f"{self.pos}; the file is corrupt or from a newer GGUF version")


class GGUFFile:
    """An opened GGUF file: `version`, `metadata` (dict), `tensors` (name -> TensorInfo).

    `get(name)` dequantises one tensor to float32 with the numpy shape (dims reversed).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such GGUF file")
        size = self.path.stat().st_size
        # np.memmap refuses empty files; an empty buffer still reports "bad magic" below.
        self._data = (np.memmap(self.path, dtype=np.uint8, mode="r") if size
                      else np.zeros(0, np.uint8))
        cur = _Cursor(memoryview(self._data), self.path)
        magic = bytes(self._data[:4])
        if magic != GGUF_MAGIC:
            raise UserError(f"{self.path}: not a GGUF file (magic number {magic!r}, expected "
                            f"{GGUF_MAGIC!r})")
        cur.take(4)
        self.version = cur.scalar("<I")
        if self.version not in SUPPORTED_VERSIONS and (self.version >> 24) in SUPPORTED_VERSIONS:
            raise UserError(f"{self.path}: a big-endian GGUF file; only little-endian files are "
                            "supported")
        if self.version not in SUPPORTED_VERSIONS:
            raise UserError(f"{self.path}: GGUF version {self.version} is not supported; this "
                            f"reader handles versions {SUPPORTED_VERSIONS}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

        self.metadata = {}
        try:
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.scalar("<I"))
        except RecursionError:  # arrays of arrays of arrays...: only a corrupt file does that
            raise UserError(f"{self.path}: GGUF metadata nested too deeply at byte {cur.pos}; "
                            "the file is corrupt") from None

        self.tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            self.tensors[name] = TensorInfo(name, dims, ggml_type, offset)

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) or \
                self.alignment < 1:
            raise UserError(f"{self.path}: general.alignment {self.alignment!r:.40} is not a "
                            "positive integer; the file is corrupt")
        self.data_start = -(-cur.pos // self.alignment) * self.alignment  # round up
        for t in self.tensors.values():
            self._check(t, size)

    def _check(self, t: TensorInfo, size: int):
        if t.type not in _BLOCK_SIZES:
            supported = ", ".join(type_name(k) for k in _BLOCK_SIZES)
            raise UserError(f"{self.path}: tensor {t.name!r} has type {type_name(t.type)}, which "
                            f"this reader cannot dequantise; supported types: {supported}")
        block = _BLOCK_SIZES[t.type][0]
        if t.dims and t.dims[0] % block:
            raise UserError(f"{self.path}: tensor {t.name!r} has rows of {t.dims[0]} elements, "
                            f"not a multiple of the {type_name(t.type)} block size {block}")
        end = self.data_start + t.offset + t.n_bytes
        if end > size:
            raise UserError(f"{self.path}: truncated GGUF file: tensor {t.name!r} ends at byte "
                            f"{end} but the file has {size} bytes; download it again")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a view into the memory map (no copy)."""
        t = self.tensors[name]
        start = self.data_start + t.offset
        return self._data[start:start + t.n_bytes]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array of shape `TensorInfo.shape`."""
        if name not in self.tensors:
            raise UserError(f"{self.path}: no tensor named {name!r}")
        t = self.tensors[name]
        return dequantize(self.raw(name), t.type).reshape(t.shape)

    def close(self):
        # Dropping the reference lets numpy unmap the file once no array views it any more.
        self._data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Decode a flat uint8 buffer of one tensor into a flat float32 array."""
    raw = np.asarray(raw, dtype=np.uint8)
    if ggml_type == F32:
        return raw.view("<f4").astype(np.float32)  # astype copies out of the read-only map
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == Q8_0:
        # ggml-quants.c dequantize_row_q8_0: x = d * q
        b = raw.view(_Q8_0_BLOCK)
        d = b["d"].astype(np.float32)[:, None]
        return (d * b["qs"].astype(np.float32)).reshape(-1)
    if ggml_type == Q4_1:
        # ggml-quants.c dequantize_row_q4_1: x = d * q + m, q in 0..15; the low nibbles of the
        # 16 bytes are elements 0..15 of the block, the high nibbles elements 16..31.
        b = raw.view(_Q4_1_BLOCK)
        q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)
        d = b["d"].astype(np.float32)[:, None]
        m = b["m"].astype(np.float32)[:, None]
        return (d * q + m).reshape(-1)
    raise UserError(f"tensor type {type_name(ggml_type)} cannot be dequantised; supported: "
                    + ", ".join(type_name(k) for k in _BLOCK_SIZES))
