"""Reading and writing ONNX tensors one at a time, without loading a whole model's weights.

A model loaded with ``onnx.load(path, load_external_data=False)`` keeps only references
``(location, offset, length)`` for tensors stored in external data files. :func:`read_array`
turns one such tensor into a read-only numpy array backed by a memory map of its file, so the
bytes are paged in only when a computation touches them, and :func:`release` gives the pages
back once a computation is done with them. Inline tensors (``raw_data`` or the typed fields)
are decoded the same way, so callers never care where a tensor lives.

Every size a file declares is checked against the bytes actually there before anything is
mapped: ``prod(dims) * itemsize`` must equal the stored length, external paths must stay inside
the model's folder, and a declared size larger than its file is an :class:`InputError` naming
the tensor. Hostile files therefore fail with one clear message instead of a crash or a huge
allocation.

Weights are solved in float64 and written back in their own dtype: :func:`to_dtype` casts and
reports which entries would not fit (``|x|`` above the dtype's largest finite value), so the
caller can refuse the units responsible instead of writing infinities.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from onnxbalance import protos
from onnxbalance.errors import InputError
from onnxbalance.memory import DroppableMap, release  # noqa: F401  (release: re-exported)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.BFLOAT16: BFLOAT16,
}

# Sub-byte types are stored packed (several values per byte): their sizes follow other rules,
# and they are never weights that balancing rescales, so onnx decodes them.
_PACKED = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT6E2M3", "FLOAT6E3M2")
    if hasattr(onnx.TensorProto, name)
)

_BF16_MAX = 3.3895313892515355e38  # (2 - 2**-7) * 2**127, largest finite bfloat16

# Fields that hold a tensor's values; everything else (name, dims, type, doc) is metadata.
_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)
_NOT_METADATA = frozenset(_DATA_FIELDS) | {"data_location", "external_data"}


_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "onnxbalance_external_folder", default=None
)


@contextlib.contextmanager
def external_folder(base_dir: Path | str | os.PathLike | None) -> Iterator[None]:
    """Resolve external data against ``base_dir`` in :func:`read_array` calls that give none.

    The steps between load and save (analysis, rewrite) take a bare ModelProto; a lazily
    loaded model's external references are relative to its file's folder, set here once.
    """
    token = _FOLDER.set(Path(base_dir) if base_dir is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


Buffer = bytes | memoryview


@dataclass
class _Kept:
    """One tensor of a model given to :func:`keep_arrays`: its decoded array once read, and
    where its raw bytes can be viewed without a copy (None: read the parsed message)."""

    tensor: onnx.TensorProto  # held, so that no other tensor can take its id
    array: np.ndarray | None = None
    source: Buffer | None = None


_ARRAYS: contextvars.ContextVar[dict[int, _Kept] | None] = contextvars.ContextVar(
    "onnxbalance_arrays", default=None
)


@contextlib.contextmanager
def arrays_kept() -> Iterator[None]:
    """Inside, :func:`read_array` decodes each inline tensor of a model given to
    :func:`keep_arrays` only once.

    Reading ``raw_data`` copies the bytes every time, and the load checks, analysis, statistics
    and rewrite all read the same weights.
    """
    token = _ARRAYS.set({})
    try:
        yield
    finally:
        _ARRAYS.reset(token)


def keep_arrays(model: onnx.ModelProto, serialized: Buffer | None = None) -> None:
    """Decode ``model``'s tensors once inside the current :func:`arrays_kept` (if any).

    ``serialized``, the bytes ``model`` was parsed from, lets the main graph's initializers be
    viewed in place rather than copied. ``model`` must not change until the block ends; tensors
    of any other message (a rewritten copy) are still decoded on every read.
    """
    kept = _ARRAYS.get()
    if kept is None:
        return
    for tensor in iter_tensors(model):
        kept.setdefault(id(tensor), _Kept(tensor))
    if serialized is None:
        return
    try:
        spans = protos.initializer_raw_spans(serialized)
    except (ValueError, IndexError):  # unusual encodings: the parsed copies serve as well
        return
    initializers = model.graph.initializer
    if len(spans) != len(initializers):
        return
    view = memoryview(serialized)
    for tensor, span in zip(initializers, spans, strict=True):
        if span is not None and tensor.HasField("raw_data"):
            offset, length = span
            kept[id(tensor)].source = view[offset : offset + length]


def current_folder() -> Path | None:
    """The folder set by the innermost :func:`external_folder`, if any."""
    return _FOLDER.get()


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: ``length`` bytes at ``offset`` of ``path``."""

    path: Path
    offset: int
    length: int | None


def numpy_dtype(data_type: int, name: str = "") -> np.dtype:
    """The numpy dtype of an ONNX element type (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if data_type in FLOAT_TYPES:
        return FLOAT_TYPES[data_type]
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"tensor '{name}' has unknown element type {data_type}") from exc
    return dtype


def max_finite(dtype: np.dtype) -> float:
    """Largest finite value of a floating dtype (bfloat16 included)."""
    if dtype == BFLOAT16:
        return _BF16_MAX
    return float(np.finfo(dtype).max)


def element_count(tensor: onnx.TensorProto) -> int:
    """``prod(dims)`` with the checks a hostile file needs (no negative dims)."""
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise InputError(f"tensor '{tensor.name}' has a negative dimension {dim}")
        count *= int(dim)
    return count


def expected_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's declared shape and type need when stored raw."""
    return element_count(tensor) * numpy_dtype(tensor.data_type, tensor.name).itemsize


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def resolve_location(base_dir: Path | str | None, location: str, name: str = "") -> Path:
    """The file an external ``location`` names, refusing paths that leave the model's folder.

    A model file decides which files the tool reads; allowing ``../`` or absolute paths would let
    a downloaded model make it read (and copy into its output) any file the user can read.
    """
    if base_dir is None:
        base_dir = _FOLDER.get()
    if base_dir is None:
        raise InputError(
            f"tensor '{name}' uses external data '{location}' but the model was not loaded from "
            "a file; load it from its path"
        )
    if not location or "\x00" in location:
        raise InputError(f"tensor '{name}' has an empty or invalid external data location")
    rel = Path(location)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise InputError(
            f"tensor '{name}' points to external data '{location}' outside the model's folder"
        )
    base = Path(base_dir).resolve()
    path = (base / rel).resolve()
    if base not in path.parents:
        raise InputError(
            f"tensor '{name}' points to external data '{location}' outside the model's folder"
        )
    return path


def external_ref(tensor: onnx.TensorProto, base_dir: Path | str | None) -> ExternalRef:
    """Parse and check an external tensor's ``location``/``offset``/``length`` entries."""
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        info[entry.key] = entry.value
    location = info.get("location", "")
    path = resolve_location(base_dir, location, tensor.name)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError as exc:
        raise InputError(
            f"tensor '{tensor.name}' has a non-numeric external offset or length"
        ) from exc
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"tensor '{tensor.name}' has a negative external offset or length")
    return ExternalRef(path, offset, length)


def _checked_external(tensor: onnx.TensorProto, base_dir: Path | str | None) -> ExternalRef:
    ref = external_ref(tensor, base_dir)
    nbytes = expected_nbytes(tensor)
    if ref.length is not None and ref.length != nbytes:
        raise InputError(
            f"tensor '{tensor.name}' declares {ref.length} external bytes but its shape and type "
            f"need {nbytes}"
        )
    try:
        size = ref.path.stat().st_size
    except OSError as exc:
        raise InputError(
            f"tensor '{tensor.name}': cannot read external data file '{ref.path.name}' "
            f"({exc.strerror or exc})"
        ) from exc
    if not ref.path.is_file():
        raise InputError(f"tensor '{tensor.name}': external data '{ref.path.name}' is not a file")
    if ref.offset + nbytes > size:
        raise InputError(
            f"tensor '{tensor.name}' needs bytes {ref.offset}..{ref.offset + nbytes} of "
            f"'{ref.path.name}' but the file has {size}; the data file is truncated or wrong"
        )
    return ExternalRef(ref.path, ref.offset, nbytes)


def map_file(path: Path, offset: int, nbytes: int, droppable: bool = True) -> np.ndarray:
    """A read-only uint8 view of ``nbytes`` at ``offset`` of ``path``, paged in on demand.

    ``droppable``: :func:`onnxbalance.memory.release` may give its pages back after use.
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    kind = DroppableMap if droppable else mmap.mmap
    with open(path, "rb") as handle:
        mapped = kind(
            handle.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ, offset=start
        )
    # The array keeps the mmap alive (its .base); closing the file does not unmap it.
    return np.frombuffer(mapped, np.uint8, count=nbytes, offset=offset - start)


def read_array(tensor: onnx.TensorProto, base_dir: Path | str | None = None) -> np.ndarray:
    """The tensor's values as a read-only numpy array of its own dtype and shape.

    External data is memory-mapped (nothing is read until used). Inline ``raw_data`` is copied
    out of the message, or, for a model given to :func:`keep_arrays` with its bytes, viewed
    where it lies in them. bfloat16 comes back as ``ml_dtypes.bfloat16``, which numpy casts to
    float32/float64.

    Raises:
        InputError: the stored bytes do not match the declared shape and type, an external file
            is missing, too short or outside the model's folder, or the type is unknown.
    """
    dtype = numpy_dtype(tensor.data_type, tensor.name)
    if tensor.data_type in _PACKED:
        return _packed(tensor, base_dir)
    shape = tuple(int(d) for d in tensor.dims)
    nbytes = expected_nbytes(tensor)
    if dtype.kind in "OSU":  # strings are never weights; let onnx decode them
        return _typed_fields(tensor)
    little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    if is_external(tensor):
        ref = _checked_external(tensor, base_dir)
        raw = map_file(ref.path, ref.offset, nbytes)
    elif tensor.HasField("raw_data"):
        return _kept(tensor, lambda data: _decoded_raw(tensor, data, little, dtype, shape, nbytes))
    else:
        return _typed_fields(tensor)
    return _decoded(raw, little, dtype, shape)


def _kept(tensor: onnx.TensorProto, decode: Callable[[Buffer], np.ndarray]) -> np.ndarray:
    """``decode(raw bytes)``, once per tensor given to :func:`keep_arrays`."""
    entry = (_ARRAYS.get() or {}).get(id(tensor))
    if entry is None or entry.tensor is not tensor:
        return decode(tensor.raw_data)
    if entry.array is None:
        entry.array = decode(tensor.raw_data if entry.source is None else entry.source)
    return entry.array


def _decoded_raw(
    tensor: onnx.TensorProto, data: Buffer, little: np.dtype, dtype: np.dtype, shape, nbytes: int
) -> np.ndarray:
    if len(data) != nbytes:
        raise InputError(
            f"tensor '{tensor.name}' holds {len(data)} bytes but its shape {list(shape)} "
            f"needs {nbytes}"
        )
    return _decoded(np.frombuffer(data, np.uint8), little, dtype, shape)


def _decoded(raw: np.ndarray, little: np.dtype, dtype: np.dtype, shape) -> np.ndarray:
    array = raw.view(little).reshape(shape)
    if little != dtype:  # big-endian host: decode once
        array = array.astype(dtype)
    array.flags.writeable = False
    return array


def _packed(tensor: onnx.TensorProto, base_dir: Path | str | None) -> np.ndarray:
    folder = ""
    if is_external(tensor):
        folder = str(external_ref(tensor, base_dir).path.parent)  # refuses escaping paths
    try:
        array = numpy_helper.to_array(tensor, base_dir=folder)
    except Exception as exc:  # onnx raises assorted types for malformed packed data
        raise InputError(f"tensor '{tensor.name}' cannot be decoded: {exc}") from exc
    array.flags.writeable = False
    return array


def _typed_fields(tensor: onnx.TensorProto) -> np.ndarray:
    """Decode values stored in the typed repeated fields (float_data, int32_data, ...)."""
    _check_typed_count(tensor)
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises assorted types for malformed typed fields
        raise InputError(f"tensor '{tensor.name}' cannot be decoded: {exc}") from exc
    array.flags.writeable = False
    return array


def _check_typed_count(tensor: onnx.TensorProto) -> None:
    count = element_count(tensor)
    stored = max(
        len(tensor.float_data),
        len(tensor.int32_data),
        len(tensor.int64_data),
        len(tensor.double_data),
        len(tensor.uint64_data),
        len(tensor.string_data),
    )
    complex_types = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
    per_value = 2 if tensor.data_type in complex_types else 1
    if stored != count * per_value:
        raise InputError(
            f"tensor '{tensor.name}' holds {stored} values but its shape {list(tensor.dims)} "
            f"needs {count * per_value}"
        )


def raw_bytes(tensor: onnx.TensorProto, base_dir: Path | str | None = None) -> memoryview:
    """The tensor's values in ONNX's raw little-endian layout (what an external file holds)."""
    array = read_array(tensor, base_dir)
    if array.dtype.kind in "OSU":
        raise InputError(f"tensor '{tensor.name}' holds strings, which cannot be stored raw")
    return raw_view(array)


def overflow_mask(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Entries whose magnitude exceeds the dtype's largest finite value (NaN is not overflow)."""
    if dtype.kind != "f" and dtype != BFLOAT16:
        return np.zeros(np.shape(values), dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.abs(values) > max_finite(dtype)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Cast float64 ``values`` to ``dtype``; also return the mask of entries that would overflow.

    Entries that were already infinite are not flagged (the input had them); finite values that
    the dtype cannot hold are, and come back as ±inf in the cast array.
    """
    values = np.asarray(values)
    mask = overflow_mask(values, dtype) & np.isfinite(values)
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    return cast, mask


def raw_view(array: np.ndarray) -> memoryview:
    """ONNX raw storage of an array (little-endian, C order) as bytes, copied only if needed."""
    if array.dtype.kind in "OSU":
        raise TypeError(f"{array.dtype} values cannot be stored raw")
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def raw_bytes_of(array: np.ndarray) -> bytes:
    """ONNX raw storage of an array: little-endian, C order."""
    return bytes(raw_view(array))


def make_tensor(name: str, array: np.ndarray, data_type: int) -> onnx.TensorProto:
    """A raw-data TensorProto holding ``array`` (already in the numpy dtype of ``data_type``)."""
    dtype = numpy_dtype(data_type, name)
    if array.dtype != dtype:
        raise ValueError(f"array dtype {array.dtype} does not match ONNX type {data_type}")
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(array.shape))
    tensor.raw_data = raw_bytes_of(array)
    return tensor


def iter_tensors(message: onnx.ModelProto | onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every stored tensor: initializers, sparse initializers' parts, node attributes, subgraphs."""
    graphs: list[onnx.GraphProto] = (
        [message.graph] if isinstance(message, onnx.ModelProto) else [message]
    )
    nodes_lists = []
    if isinstance(message, onnx.ModelProto):
        nodes_lists.extend(function.node for function in message.functions)
    while graphs or nodes_lists:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes_lists.append(graph.node)
            continue
        for node in nodes_lists.pop():
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield attribute.sparse_tensor.values
                    yield attribute.sparse_tensor.indices
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def external_names(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the tensors stored in external data files (the layout to keep on save)."""
    return frozenset(t.name for t in iter_tensors(model) if is_external(t))


def check_tensors(model: onnx.ModelProto, base_dir: Path | str | None) -> None:
    """Check every stored tensor without reading external data: a known element type,
    non-negative dims, inline bytes or values matching the declared shape, and external
    references inside the model's folder and within their files.

    Raises:
        InputError: naming the first tensor that fails.
    """
    for tensor in iter_tensors(model):
        dtype = numpy_dtype(tensor.data_type, tensor.name)
        element_count(tensor)  # refuses negative dims
        if tensor.data_type in _PACKED:
            if is_external(tensor):
                external_ref(tensor, base_dir)
        elif is_external(tensor):
            _checked_external(tensor, base_dir)
        elif tensor.HasField("raw_data"):
            if dtype.kind not in "OSU":
                read_array(tensor)  # checks the byte count; kept if :func:`keep_arrays` applies
        elif dtype.kind not in "OSU":
            _check_typed_count(tensor)


SHAPE_CONSTANT_ELEMENTS = 1024
"""Floating-point constants up to this size keep their values in :func:`without_weights`: shape
inference reads small constants (Resize scales, Reshape targets); weights are never that small."""


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its weights declared instead of stored: all ``onnx.checker`` and shape
    inference need, without copying every weight into C++ and back.

    Each external initializer of the main graph, and each floating-point one larger than
    :data:`SHAPE_CONSTANT_ELEMENTS`, becomes a graph input of the same name, type and shape; so
    does the output of each Constant node holding such a tensor. The checker and shape inference
    reach the same verdict and the same shapes (the tensors themselves are checked by
    :func:`check_tensors`). Initializers that are also graph inputs, or whose name repeats, stay
    as they are, so the checker still sees those conflicts.
    """
    graph = model.graph
    taken = {value.name for value in graph.input}
    counts = collections.Counter(tensor.name for tensor in graph.initializer)
    skeleton = protos.without_initializers(model)
    declared = skeleton.graph.input
    for tensor in graph.initializer:
        if tensor.name not in taken and counts[tensor.name] == 1 and _is_weight(tensor):
            declared.append(_declaration(tensor.name, tensor))
        else:
            skeleton.graph.initializer.append(tensor)
    constants = {i: value for i, node in enumerate(graph.node) if (value := _large_constant(node))}
    if constants:
        del skeleton.graph.node[:]
        for i, node in enumerate(graph.node):
            if i in constants:
                declared.append(_declaration(node.output[0], constants[i]))
            else:
                skeleton.graph.node.append(node)
    return skeleton


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return is_external(tensor) or (
        tensor.data_type in FLOAT_TYPES and element_count(tensor) > SHAPE_CONSTANT_ELEMENTS
    )


def _large_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and _is_weight(attr.t):
            return attr.t
    return None


def _declaration(name: str, tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims)


def copy_metadata(tensor: onnx.TensorProto, dims: Sequence[int] | None = None) -> onnx.TensorProto:
    """A tensor with every field of ``tensor`` (name, type, doc, ...) but no values and no storage
    information; with ``dims`` when given. Fields unset in ``tensor`` stay unset."""
    stub = protos.copy_except(tensor, _NOT_METADATA)
    if dims is not None:
        del stub.dims[:]
        stub.dims.extend(dims)
    return stub
