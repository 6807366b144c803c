"""A fast reader of the GGUF container: metadata as Python values, tensors as memory-mapped numpy arrays.

``gguf.GGUFReader`` builds numpy views for every element of every metadata
array, which takes minutes for a 262,144-token vocabulary; this reader walks
the header once with ``struct`` and maps the tensor data with ``np.memmap``
(nothing is unpickled, nothing is copied until a tensor is converted). Layout
(GGUF v2/v3, little-endian): magic ``GGUF``, version, tensor count, key/value
count, the key/values, the tensor infos (name, dims ``ne0..``, ggml type,
offset), then the data from the next multiple of ``general.alignment``.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import GGUFError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ``shape`` lists ``ne0`` first; ``data`` is ``(ne_last, ..., ne1, row)``.

    ``row`` is ``ne0`` values for float types and the bytes of ``ne0 / block`` blocks for quantized ones.
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{str(self.path)!r}: the header ends early at byte {self.pos}; the file "
                            f"({len(self.buf)} bytes) is truncated or corrupt")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{str(self.path)!r}: a string runs past the end of the file; it is truncated or corrupt")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            if sub == STRING:
                return [self.string() for _ in range(n)]
            if sub not in _NUMPY:
                raise GGUFError(f"{str(self.path)!r}: unknown metadata array type {sub}; the file is corrupt")
            dt = np.dtype(_NUMPY[sub])
            if self.pos + n * dt.itemsize > len(self.buf):
                raise GGUFError(f"{str(self.path)!r}: a metadata array runs past the end; the file is truncated")
            a = np.frombuffer(self.buf, dt, n, self.pos)
            self.pos += n * dt.itemsize
            return a.tolist()
        if kind not in _SCALARS:
            raise GGUFError(f"{str(self.path)!r}: unknown metadata value type {kind}; the file is corrupt")
        v = self.take(_SCALARS[kind])
        if kind == 6:  # float32: the shortest decimal that rounds to it (1e-05)
            v = float(str(np.float32(v)))
        return v


def _metadata(buf, p: Path) -> tuple[_Cursor, dict[str, Any]]:
    """The header's metadata and a cursor just past the key/values (at the tensor infos)."""
    c = _Cursor(buf, p)
    c.take("<I")  # magic
    version = c.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{str(p)!r}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    return c, meta


KV_START = 24  # magic, version, tensor count and key/value count come first


def metadata_bytes(path: str | os.PathLike) -> bytes:
    """The raw key/value section of a GGUF file, value types included (to copy the metadata verbatim).

    It starts at byte :data:`KV_START` and holds ``GGUF.kv_count`` entries.
    """
    p = Path(path)
    buf = np.memmap(p, np.uint8, mode="r")
    c, _ = _metadata(buf, p)
    return bytes(buf[KV_START : c.pos])


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensors of a GGUF file (the caller has checked the magic).

    Raises:
      GGUFError: a truncated or corrupt file, or an unknown ggml tensor type (naming the file).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    buf = np.memmap(p, np.uint8, mode="r")
    c, meta = _metadata(buf, p)
    n_tensors = meta["GGUF.tensor_count"]
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(int(c.take("<Q")) for _ in range(c.take("<I")))
        kind, offset = c.take("<I"), c.take("<Q")
        try:
            ttype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFError(f"{str(p)!r}: tensor {name!r} has an unknown ggml type {kind}") from None
        infos.append((name, dims, ttype, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        block, nbytes = GGML_QUANT_SIZES[ttype]
        ne0 = dims[0] if dims else 1
        rows = tuple(reversed(dims[1:]))
        row_bytes = ne0 // block * nbytes
        size = row_bytes * int(np.prod(rows, dtype=np.int64))
        lo = start + offset
        if lo + size > len(buf):
            raise GGUFError(f"{str(p)!r}: tensor {name!r} needs bytes {lo}..{lo + size} but the file has "
                            f"{len(buf)}; it is truncated or corrupt")
        raw = buf[lo : lo + size]
        if ttype.name in ("F32", "F16"):
            data = raw.view(np.float32 if ttype.name == "F32" else np.float16).reshape(*rows, ne0)
        else:
            data = raw.reshape(*rows, row_bytes)
        tensors[name] = TensorInfo(name, dims, ttype, data)
    return meta, tensors
