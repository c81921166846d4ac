"""Tensors as they lie in a file, read a slab of rows at a time with plain reads (no mmap).

Loading copies each slab straight into its place in the preallocated parameter tree, so the host never holds a
second copy of a tensor: peak memory is the model in its target dtype plus one slab. A memory map would add the
touched file pages to the process's resident set, and a whole-tensor read would add the largest tensor (the
embedding: a fifth of a small model).

The safetensors header is read here rather than through `safetensors.safe_open`, which maps the file and hands out
whole tensors; the format is the 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from jaxft.errors import FileFormatError

SLAB_BYTES = 16 << 20  # float32 bytes per slab handed to the loader

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
# Integers are read only as bytes: bitsandbytes' packed 4-bit codes (in any quant_storage dtype) and quant states
# (`jaxft.io.bnb_checkpoint`); the loader refuses them as dense weights.
_ST_INTEGERS = {"U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "I32": np.int32,
                "U64": np.uint64, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a file in HF layout: `decode(raw uint8 rows [r, row_bytes]) -> float rows [r, ...]`.

    `row_order[i]` is the row of the HF tensor that stored row `i` holds (GGUF q/k projections store the rows of
    each head interleaved); None when they are in order.
    """

    name: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int
    decode: Callable[[np.ndarray], np.ndarray]
    row_order: np.ndarray | None = None
    dtype: str | None = None  # the safetensors dtype ("F32", "U8", ...); None for GGUF tensors

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def slabs(self, slab_bytes: int = SLAB_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """`(first_row, float rows)` covering the tensor in order, each about `slab_bytes` as float32."""
        for r0, rows in self._slabs_between(0, self.rows, slab_bytes):
            yield r0, rows if self.shape else rows.reshape(())

    def array(self) -> np.ndarray:
        """The whole tensor as a float32 array in HF layout (row order restored)."""
        out = np.empty(self.shape, np.float32)
        self.copy_into(out)
        return out

    def block(self, index: tuple[slice, ...], dtype, slab_bytes: int = SLAB_BYTES) -> np.ndarray:
        """`tensor[index]` in HF layout and `dtype`, reading only the rows `index[0]` selects, a slab at a time (all
        rows when the stored order differs from HF's, keeping the selected ones): the loader of one device's shard
        holds that shard plus one slab, never the whole tensor."""
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        if not self.shape:
            return np.asarray(next(self.slabs())[1], dtype)
        rows = range(self.rows)[index[0]]
        out = np.empty((len(rows), *(len(range(d)[i]) for d, i in zip(self.shape[1:], index[1:]))), dtype)
        if not len(rows):
            return out
        lo, hi = rows.start, rows.stop
        if self.row_order is not None:  # stored row i holds HF row row_order[i]: scan all, keep the wanted ones
            for r0, slab in self.slabs(slab_bytes):
                hf_rows = np.asarray(self.row_order[r0:r0 + len(slab)])
                keep = (hf_rows >= lo) & (hf_rows < hi)
                if keep.any():
                    out[hf_rows[keep] - lo] = slab[keep][(slice(None), *index[1:])]
            return out
        for r0, slab in self._slabs_between(lo, hi, slab_bytes):
            out[r0 - lo:r0 - lo + len(slab)] = slab[(slice(None), *index[1:])]
        return out

    def _slabs_between(self, lo: int, hi: int, slab_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        row_bytes = self.nbytes // self.rows
        step = max(1, slab_bytes // max(1, 4 * math.prod(self.shape[1:])))
        with open(self.path, "rb") as f:
            for r0 in range(lo, hi, step):
                n = min(step, hi - r0)
                raw = np.empty((n, row_bytes), np.uint8)
                f.seek(self.offset + r0 * row_bytes)
                if f.readinto(raw) != raw.nbytes:
                    raise FileFormatError(f"{self.path}: tensor '{self.name}' ends past the end of the file "
                                          "(truncated or corrupt)")
                yield r0, self.decode(raw).reshape((n, *self.shape[1:]))

    def _dest(self, r0: int, n: int):
        return slice(r0, r0 + n) if self.row_order is None else self.row_order[r0:r0 + n]

    def copy_into(self, dst: np.ndarray) -> None:
        """Write the tensor into `dst` (HF layout, any strides and float dtype), one slab at a time."""
        if not self.shape:
            dst[...] = next(self.slabs())[1]
            return
        for r0, rows in self.slabs():
            dst[self._dest(r0, len(rows))] = rows


def _corrupt(path: str, why: str) -> FileFormatError:
    return FileFormatError(f"{path}: unreadable safetensors file (truncated or corrupt: {why}); download or save "
                           "it again")


def safetensors_tensors(path: str) -> list[StoredTensor]:
    """The tensors of one `.safetensors` file, from its header; checks every tensor lies inside the file."""
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: missing, yet model.safetensors.index.json lists it; copy the whole model "
                              "directory again")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "no header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _corrupt(path, f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(path, f"header is a JSON {type(header).__name__}, not an object")
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or any(k not in info for k in ("dtype", "shape", "data_offsets")):
            raise _corrupt(path, f"header entry '{name}' lacks dtype, shape or data_offsets")
        if info["dtype"] not in _ST_DTYPES and info["dtype"] not in _ST_INTEGERS:
            raise FileFormatError(f"{path}: tensor '{name}' has dtype {info['dtype']}; jaxft reads floating "
                                  f"weights ({', '.join(_ST_DTYPES)}): convert the checkpoint to float")
        try:
            dtype = np.dtype({**_ST_DTYPES, **_ST_INTEGERS}[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (TypeError, ValueError) as e:
            raise _corrupt(path, f"header entry '{name}' is malformed ({e})") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise _corrupt(path, f"tensor '{name}' spans {end - start} bytes for shape {shape} {info['dtype']}")
        if base + end > size:
            raise _corrupt(path, f"tensor '{name}' ends at byte {base + end} of a {size}-byte file")
        decode = (lambda raw, dt=dtype.newbyteorder("<"): raw.view(dt))
        out.append(StoredTensor(name, shape, path, base + start, end - start, decode, dtype=info["dtype"]))
    return out
