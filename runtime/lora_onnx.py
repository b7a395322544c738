"""Reading named initializers out of an ONNX file without the ``onnx`` package (the runtime has none).

An ONNX file is a protobuf ``ModelProto``; its weights are the ``initializer`` entries (field 5)
of the graph (field 7). A weight is stored either inline (``raw_data``) or in an external file
(``external_data``: location, offset, length). This walks the message just far enough to find
the requested tensors and copies them out; everything else is skipped by its length prefix, so
a 3 GB UNet is read in well under a second. Weights stored as typed lists (``float_data``) are
refused: the exporter writes raw data.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _RAW, _EXTERNAL, _LOCATION = 1, 2, 8, 9, 13, 14


class OnnxReadError(ValueError):
    """The file is not an ONNX model this reader understands, or lacks a requested tensor."""


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of a message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, wire, pos, pos + length
            pos += length
        elif wire == 1:
            yield field, wire, pos, pos + 8
            pos += 8
        elif wire == 5:
            yield field, wire, pos, pos + 4
            pos += 4
        else:
            raise OnnxReadError(f"unsupported protobuf wire type {wire}")


def _tensor(buf, start: int, end: int) -> tuple[str, np.ndarray | None]:
    name, dims, dtype, raw, external = "", [], 0, None, {}
    for field, wire, a, b in _fields(buf, start, end):
        if field == _NAME:
            name = bytes(buf[a:b]).decode()
        elif field == _DIMS and wire == 0:
            dims.append(a)
        elif field == _DIMS:  # packed
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos)
                dims.append(value)
        elif field == _DATA_TYPE:
            dtype = a
        elif field == _RAW:
            raw = (a, b)
        elif field == _EXTERNAL:
            entry = {f: bytes(buf[x:y]).decode() for f, _, x, y in _fields(buf, a, b)}
            external[entry.get(1, "")] = entry.get(2, "")
    return name, (dims, dtype, raw, external)


@dataclass(frozen=True)
class Location:
    """Where an initializer's raw bytes are: in the model file itself (``file`` None) or an external file."""

    dims: tuple[int, ...]
    dtype: np.dtype
    file: str | None
    offset: int
    nbytes: int


def locate(path: str | Path, names: Iterable[str]) -> dict[str, Location]:
    """The ``Location`` of each initializer in ``names`` of the ONNX file at ``path``."""
    path = Path(path)
    wanted, found = set(names), {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = next(((a, b) for f, w, a, b in _fields(buf, 0, len(buf)) if f == _MODEL_GRAPH and w == 2), None)
        if graph is None:
            raise OnnxReadError(f"{path} has no graph; is it an ONNX model?")
        for field, wire, a, b in _fields(buf, *graph):
            if field != _GRAPH_INITIALIZER or wire != 2:
                continue
            name, (dims, dtype, raw, external) = _tensor(buf, a, b)
            if name not in wanted:
                continue
            if DTYPES.get(dtype) is None:
                raise OnnxReadError(f"{path}: initializer {name} has ONNX data type {dtype}; this reader takes float "
                                    f"and int tensors")
            dtype = np.dtype(DTYPES[dtype])
            nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if raw is not None:
                found[name] = Location(tuple(dims), dtype, None, raw[0], nbytes)
            elif external:
                location = external.get("location", "")
                if (path.parent / location).resolve().parent != path.parent.resolve():
                    raise OnnxReadError(f"{path}: initializer {name} points outside the export folder")
                found[name] = Location(tuple(dims), dtype, location, int(external.get("offset", 0)), nbytes)
            else:
                raise OnnxReadError(f"{path}: initializer {name} is not stored as raw data; re-export the model")
    missing = wanted - set(found)
    if missing:
        raise OnnxReadError(f"{path} has no initializer {min(missing)}; re-export the model")
    return found


def read_initializers(path: str | Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the initializers ``names`` of the ONNX file at ``path`` (inline or external data)."""
    path = Path(path)
    result = {}
    for name, where in locate(path, names).items():
        source = path if where.file is None else path.parent / where.file
        data = np.fromfile(source, dtype=where.dtype, count=where.nbytes // where.dtype.itemsize, offset=where.offset)
        if data.nbytes != where.nbytes:
            raise OnnxReadError(f"{source} is shorter than initializer {name} needs; re-export the model")
        result[name] = data.reshape(where.dims)
    return result


def patched_model(path: str | Path, values: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The ONNX file at ``path`` with the initializers ``values`` replaced, as ONNX Runtime takes it from
    memory: the model's bytes, and each external data file as a uint8 array (a copy-on-write map of the
    file: only the pages holding replaced weights take memory). Same names, shapes and dtypes only."""
    path = Path(path)
    model = bytearray(path.read_bytes())
    external: dict[str, np.ndarray] = {}
    for name, where in locate(path, values).items():
        value = np.ascontiguousarray(values[name], dtype=where.dtype)
        if value.nbytes != where.nbytes:
            raise OnnxReadError(f"{name}: {value.nbytes} bytes for a {where.nbytes}-byte initializer")
        if where.file is None:
            model[where.offset:where.offset + where.nbytes] = value.tobytes()
            continue
        if where.file not in external:
            with open(path.parent / where.file, "rb") as handle:
                external[where.file] = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY),
                                                     dtype=np.uint8)
        external[where.file][where.offset:where.offset + where.nbytes] = value.reshape(-1).view(np.uint8)
    return bytes(model), external
