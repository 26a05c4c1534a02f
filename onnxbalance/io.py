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
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

_FULL_CHECK_BYTES = 256 * 2**20
"""Shape inference (the checker's full check) only below this size: it is cheap for small models,
and for huge ones the structural check already catches malformed graphs."""


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX model, with weights stored outside it loaded from its folder.

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
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: not an ONNX model or truncated ({_first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version)")
    if not uses_external_data(model):
        # The checker reads the bytes we already hold: checking the parsed proto would serialise
        # it again, which costs more than reading the file.
        check_model(data, str(path), full=len(data) < _FULL_CHECK_BYTES)
        return model
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as exc:
        raise InputError(
            f"{path}: cannot read its external weight data: {_first_line(exc)}"
        ) from None
    check_model(model, str(path), full=False)
    return model


def check_model(model: onnx.ModelProto | bytes, name: str = "model", full: bool = True) -> None:
    """Run ``onnx.checker`` (structure, opsets; with ``full``, strict shape inference too).

    Raises:
        InputError: with the checker's first line.
    """
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"{name}: invalid ONNX model: {_first_line(exc)}") from None
    except ValueError as exc:  # e.g. a model over 2 GB passed as a proto
        log.info("skipping onnx.checker on %s: %s", name, exc)


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(model)
    )


def check_output_path(
    out: str | os.PathLike[str], *inputs: str | os.PathLike[str], what: str = "output"
) -> Path:
    """Refuse an output path before any work is done.

    Raises:
        OutputError: the folder is missing, the path is a folder, or it is one of ``inputs``
            (same path, symlink or hard link to the same file).
    """
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputError(f"{out}: {what} path is a folder; give a file name")
    if not folder.is_dir():
        raise OutputError(f"{out}: {what} folder {folder} does not exist; create it first")
    for src in inputs:
        if _same_file(out, Path(src)):
            raise OutputError(
                f"{out}: {what} is the same file as the input {src}; "
                "the input is never overwritten, choose another name"
            )
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically.

    A model too large for one protobuf message keeps its weights in ``<name>.data`` beside it;
    the data file is put in place before the model that points at it.

    Raises:
        OutputError: the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    data = _serialize(model)
    if data is not None:
        write_bytes(path, data)
        return
    data_name = path.name + ".data"
    with _temporary_folder(path) as tmp:
        staged = onnx.ModelProto()
        staged.CopyFrom(model)
        try:
            onnx.save_model(
                staged,
                str(tmp / path.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
            )
            _make_readable(tmp / data_name)
            _make_readable(tmp / path.name)
            os.replace(tmp / data_name, path.parent / data_name)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        try:
            os.replace(tmp / path.name, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path.parent / data_name)
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        OutputError: on any OS error; the temporary file is removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist; create it first")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
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


def _serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it is over protobuf's 2 GB limit."""
    try:
        return model.SerializeToString()
    except ValueError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def _temporary_folder(path: Path) -> Iterator[Path]:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        tmp = tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    with tmp as name:
        yield Path(name)


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
