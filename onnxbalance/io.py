"""Reading models and input arrays, and writing results atomically.

Every failure the user can cause becomes an :class:`InputError` or :class:`OutputError` whose one
line names the file and what is wrong. Writes go to a temporary file in the target folder that is
renamed over the target (``os.replace``, atomic on one filesystem), so a reader never sees half a
file and a failed run leaves nothing behind. The input is only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from . import protos, safewrite, tensors
from .errors import InputError, OutputError

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX model; weights stored outside it stay on disk until read.

    Raises:
        InputError: missing, not a regular file, not ONNX (or truncated), external data
            missing, or rejected by ``onnx.checker``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        data = _mapped_or_read(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    model = onnx.ModelProto()
    try:
        _parse(model, data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not an ONNX model or truncated ({_first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version)")
    try:
        _check_text(model)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a valid ONNX model (a text field is not UTF-8)") from None
    tensors.keep_arrays(model, data)  # read-only from here on: weights are viewed in `data`
    try:
        # Weights in external files stay there: checked here (known types, paths inside the
        # folder, sizes within the files), memory-mapped later one tensor at a time.
        tensors.check_tensors(model, path.parent)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    check_model(tensors.without_weights(model), str(path))
    return model


def _mapped_or_read(path: Path) -> memoryview:
    """The file's bytes, memory-mapped: the parser copies what it keeps and weights are viewed
    in place, where reading would first copy the whole file into fresh memory. Read instead
    where the file cannot be mapped."""
    try:
        return memoryview(tensors.map_file(path, 0, path.stat().st_size, droppable=False))
    except (OSError, ValueError):
        return memoryview(path.read_bytes())


def _parse(model: onnx.ModelProto, data: memoryview) -> None:
    try:
        model.ParseFromString(data)
    except TypeError:  # a protobuf build that only parses bytes: one copy more
        model.ParseFromString(bytes(data))


def _check_text(message) -> None:
    """Refuse text fields that are not UTF-8: protobuf (proto2) keeps them as raw bytes, and
    they would fail later, wherever a name happens to be read or copied. Bytes fields (tensor
    data) are not touched."""
    strings, singles, repeats = _text_fields(message.DESCRIPTOR)
    for name, repeated in strings:
        value = getattr(message, name)
        for text in value if repeated else (value,):
            if not isinstance(text, str):
                raise UnicodeDecodeError("utf-8", bytes(text), 0, 1, name)
    for name in singles:
        if message.HasField(name):
            _check_text(getattr(message, name))
    for name in repeats:
        for item in getattr(message, name):
            _check_text(item)


@functools.cache
def _text_fields(
    descriptor,
) -> tuple[tuple[tuple[str, bool], ...], tuple[str, ...], tuple[str, ...]]:
    """A message type's (string fields, singular message fields, repeated message fields)."""
    fields = descriptor.fields
    return (
        tuple((f.name, protos.is_repeated(f)) for f in fields if f.type == f.TYPE_STRING),
        tuple(f.name for f in fields if f.type == f.TYPE_MESSAGE and not protos.is_repeated(f)),
        tuple(f.name for f in fields if f.type == f.TYPE_MESSAGE and protos.is_repeated(f)),
    )


def check_model(model: onnx.ModelProto, name: str = "model") -> None:
    """Run ``onnx.checker``: structure, opsets and strict shape inference.

    Raises:
        InputError: with the checker's first line.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"{name}: invalid ONNX model: {_first_line(exc)}") from None
    except ValueError as exc:  # e.g. a model over 2 GB passed as a proto
        log.info("skipping onnx.checker on %s: %s", name, exc)


def check_output_path(
    out: str | os.PathLike[str],
    *inputs: str | os.PathLike[str],
    what: str = "output",
    direct_ok: bool = False,
) -> Path:
    """Refuse an output path before any work is done.

    ``direct_ok``: an existing character device, FIFO or socket (``/dev/null``, ``/dev/stdout``)
    is written directly (:func:`write_bytes`); otherwise it is refused, never renamed over.

    Raises:
        OutputError: the folder is missing or not writable, the path is a folder (or a special
            file where those are not written), or it is one of ``inputs`` (same path, symlink or
            hard link to the same file).
    """
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputError(f"{out}: {what} path is a folder; give a file name")
    if not folder.is_dir():
        raise OutputError(f"{out}: {what} folder {folder} does not exist; create it first")
    kind = special_file_kind(out)
    if kind and not direct_ok:
        raise OutputError(f"{out}: {what} is {kind}, not a regular file; give a file name")
    writable = os.access(out, os.W_OK) if kind else os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise OutputError(f"{out}: cannot write the {what}: permission denied")
    for src in inputs:
        if _same_file(out, Path(src)):
            raise OutputError(
                f"{out}: {what} is the same file as the input {src}; "
                "the input is never overwritten, choose another name"
            )
    return out


def check_side_output(
    path: str | os.PathLike[str],
    *,
    what: str,
    source: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    output: str | os.PathLike[str] | None = None,
    others: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Refuse a side output (``--report``, ``--plot``) before any work is done: it may not be
    the model ``source``, a file the model references (its external data), another input, the
    ``output`` or a name its data file can take, nor one of the ``others`` side outputs (by
    what they are).

    Raises:
        OutputError: naming the file it would have replaced.
    """
    path = check_output_path(path, source, *inputs, what=what, direct_ok=True)
    if output is not None:
        out = Path(output)
        if _same_file(path, out):
            raise OutputError(f"{path}: {what} is OUT {out}; choose another name")
        if safewrite.is_data_name_of(out, path):
            raise OutputError(f"{path}: {what} would be OUT's data file; choose another name")
    for other_what, other in (others or {}).items():
        if _same_file(path, Path(other)):
            raise OutputError(
                f"{path}: {what} is the same file as the {other_what} {other}; choose another name"
            )
    if not special_file_kind(path):
        for referenced in _referenced_files(Path(source), path):
            if _same_file(path, referenced):
                raise OutputError(
                    f"{path}: {what} is the external data file {referenced.name} of the input "
                    f"{source}; the input is never overwritten, choose another name"
                )
    return path


def _referenced_files(source: Path, candidate: Path) -> set[Path]:
    """The external data files of the model ``source`` that ``candidate`` could be: only an
    existing file inside the model's folder can be (farther paths are refused when it loads),
    so the model is parsed only for such a candidate."""
    try:
        inside = candidate.resolve().is_relative_to(source.resolve().parent)
    except OSError:
        inside = True
    if not inside or not candidate.exists() or not source.is_file():
        return set()
    try:
        model = onnx.load(source, load_external_data=False)
    except Exception:  # unreadable: loading it fails with its own one line before any write
        return set()
    return {
        tensors.external_ref(tensor, source.parent).path
        for tensor in tensors.iter_tensors(model)
        if tensors.is_external(tensor)
    }


def special_file_kind(path: str | os.PathLike[str]) -> str:
    """'a character device', 'a FIFO', ... when ``path`` (followed through symlinks) exists and is
    neither a regular file nor a folder; '' otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    for test, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return ""


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    external: frozenset[str] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, streaming tensors (:mod:`onnxbalance.safewrite`).

    Tensors stored in external files keep that storage, in ``<name>.data`` (or ``<name>.N.data``)
    (read from ``base_dir``, default: the folder set by ``tensors.external_folder``); a model
    too large for one protobuf message moves its largest tensors there too. The data file is
    put in place, under a name no file has, before the model that points at it.

    Raises:
        OutputError: the folder is missing or not writable, the disk is full, or ``path`` is
            one of the input's data files.
    """
    folder = base_dir if base_dir is not None else tensors.current_folder()
    safewrite.save_model(model, path, base_dir=folder, external=external)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename;
    an existing character device, FIFO or socket (``/dev/stdout``) is written directly instead,
    never replaced.

    Raises:
        OutputError: on any OS error; the temporary file is removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist; create it first")
    if special_file_kind(path):
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        return
    tmp_name = None
    try:
        # a short name: a legal 250-character target name must not fail for its temporary
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".onnxbalance-", suffix=".tmp")
        # No fsync: the rename already keeps readers from ever seeing half a file; surviving a
        # power cut would cost more than the whole write of a large model.
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _make_readable(Path(tmp_name))
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays from a ``.npz`` file, keyed by the model input they feed.

    Raises:
        InputError: missing file or not an ``.npz`` archive.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (--inputs expects a .npz archive)")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: a single .npy array; --inputs expects a .npz archive")
        with archive:
            return {name: archive[name] for name in archive.files}
    except InputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@functools.cache
def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_readable(path: Path) -> None:
    """mkstemp creates files 0600; give the result the mode a plain ``open`` would."""
    os.chmod(path, 0o666 & ~_umask())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
