"""Writing a model (and its external data) so that nothing is ever half-written or lost.

The output is built in a hidden temporary folder next to its destination (so it can be opened
and verified exactly as it will be), fsynced (in a background thread started as each file is
complete, so the disk flush overlaps verification; commit waits for it), and only then renamed
into place. The model file is the single commit point: the data file goes in first under a name
no existing file has (so the old model, which may reference the old data file, stays valid), then
the model replaces the old one, then the old model's data file is removed. Any exception or
interrupt before the model's rename removes the temporary folder and leaves an existing output
untouched; cleanup itself holds SIGINT/SIGTERM until it is done. The folder's removal belongs to
the object that stages it (as :class:`tempfile.TemporaryDirectory`'s does), so an interrupt
between staging and the caller's ``with`` still removes it, when the object is dropped or at
exit at the latest; a folder left by a killed run is removed by the next run on the same output.

Tensor storage follows the input: a tensor stored externally is written to ``OUT.name +
".data"`` beside the output (``OUT.name + ".1.data"`` when that name is taken, as it is when
an earlier output is replaced), one stored inline stays inline. Tensor bytes are streamed one
tensor at a time (external sources are copied file-to-file; tensors produced while writing go
block by block into their place in the data file, or into holes left in the serialized model,
:func:`onnxbalance.protos.serialized_pieces`; a large one is written by a thread while the next
blocks are computed), so neither the model's weights nor a serialized model larger than
protobuf's 2 GB limit ever sit in memory as one message.
The input's own data files are never written: the output's data file never takes the name of
an existing file, and an output that is one of them is refused.

The bytes written depend only on the model: tensors appear in graph order at offsets aligned
like ``onnx.save`` aligns them, and no timestamps or random names reach the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxbalance import protos, tensors
from onnxbalance.errors import Interrupted, OutputError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
"""A serialized protobuf message cannot be larger than this."""

INLINE_BUDGET = PROTOBUF_LIMIT - 64 * 2**20
"""Inline tensor bytes allowed before the largest ones move to external data (room for the
graph itself)."""

ALIGN_THRESHOLD = 2**20
ALLOCATION_GRANULARITY = 65536
"""Tensors of at least 1 MiB start at multiples of 64 KiB, as ``onnx.save`` aligns them, so
onnxruntime can memory-map them on every platform."""

_CHUNK = 16 * 2**20
_PAUSE_ENV = "ONNXBALANCE_TEST_PAUSE_BEFORE_COMMIT"
_STAGING_PREFIX = ".onnxbalance-"
_COMMITTED: set[Path] = set()  # every output this process has moved into place


def was_committed(out: str | os.PathLike) -> bool:
    """Whether this process has moved a complete output into place at ``out``."""
    return Path(out).absolute() in _COMMITTED


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the duration (main thread only).

    SIGTERM's default action kills the process without running ``finally`` blocks, which would
    leave temporary files behind; raising instead lets every writer clean up.
    """
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one as an interrupt."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if pending:
        raise Interrupted(pending[0])


def _pause_for_tests() -> None:
    """Let a test deliver a signal while temporaries exist (``marker-path:seconds``)."""
    setting = os.environ.get(_PAUSE_ENV)
    if not setting:
        return
    marker, _, seconds = setting.rpartition(":")
    Path(marker).write_text("paused")
    time.sleep(float(seconds))


def data_path_for(out: Path) -> Path:
    """Where the external data of the model saved at ``out`` goes when that name is free."""
    return out.with_name(out.name + ".data")


def is_data_name_of(out: Path, path: Path) -> bool:
    """Whether ``path`` is one of the names :func:`fresh_data_path` can give ``out``'s data."""
    pattern = re.escape(out.name) + r"(\.[0-9]+)?\.data"
    return path.parent.resolve() == out.parent.resolve() and bool(re.fullmatch(pattern, path.name))


def fresh_data_path(out: Path, avoid: Iterable[Path] = ()) -> Path:
    """``OUT.name + ".data"``, or ``OUT.name + ".N.data"`` with the smallest N whose name is
    free: the new data file never replaces one an existing model (the old OUT) references."""
    avoided = {Path(p).resolve() for p in avoid}
    number = 0
    while True:
        suffix = ".data" if number == 0 else f".{number}.data"
        candidate = out.with_name(out.name + suffix)
        if not os.path.lexists(candidate) and candidate.resolve() not in avoided:
            return candidate
        number += 1


def _staging_key(out: Path) -> str:
    """A short tag of OUT's name: staging folders stay short (a 240-character OUT name is
    legal) and the next run on the same OUT finds the ones a killed run left."""
    return hashlib.sha256(os.fsencode(out.name)).hexdigest()[:8]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Remove staging folders for ``out`` left by runs that no longer exist (SIGKILL, power
    cut); folders of live runs, ours included, are left alone."""
    folder = out.parent if str(out.parent) else Path(".")
    pattern = re.compile(re.escape(_STAGING_PREFIX + _staging_key(out)) + r"-([0-9]+)-[0-9a-f]+")
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match and not _process_alive(int(match.group(1))):
                log.info("removing %s, left by an interrupted run", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


def _replaced_data_files(out: Path) -> set[Path]:
    """The data files of the model now at ``out`` that carry one of our data names (none if
    there is no such file, which spares parsing the old model, or it cannot be read)."""
    folder = out.parent if str(out.parent) else Path(".")
    with contextlib.suppress(OSError):
        if not out.is_file() or not any(
            is_data_name_of(out, folder / name) for name in os.listdir(folder)
        ):
            return set()
    try:
        model = onnx.load(out, load_external_data=False)
        referenced = _source_files(model, folder)
    except Exception:  # not a model we can read: it references nothing we would remove
        return set()
    return {path for path in referenced if is_data_name_of(out, path)}


def _aligned(offset: int, nbytes: int) -> int:
    if nbytes >= ALIGN_THRESHOLD and offset % ALLOCATION_GRANULARITY:
        return offset + ALLOCATION_GRANULARITY - offset % ALLOCATION_GRANULARITY
    return offset


def _stored_nbytes(tensor: onnx.TensorProto) -> int:
    try:
        return tensors.expected_nbytes(tensor)
    except Exception:  # strings or unknown types: never moved to external data
        return 0


def _choose_external(
    model: onnx.ModelProto, external: Iterable[str] | None
) -> tuple[frozenset[str], list[str]]:
    """Names to store externally: the requested layout, plus the largest inline tensors when
    keeping them inline would exceed the protobuf limit. Returns (names, names moved)."""
    all_tensors = list(tensors.iter_tensors(model))
    names = (
        set(external)
        if external is not None
        else {t.name for t in all_tensors if tensors.is_external(t)}
    )
    inline = sorted(
        (t for t in all_tensors if t.name not in names and t.name and _stored_nbytes(t)),
        key=lambda t: (-_stored_nbytes(t), t.name),
    )
    total = sum(_stored_nbytes(t) for t in inline)
    moved = []
    for tensor in inline:
        if total <= INLINE_BUDGET:
            break
        names.add(tensor.name)
        moved.append(tensor.name)
        total -= _stored_nbytes(tensor)
    return frozenset(names), moved


def _copy_range(source: Path, offset: int, length: int, sink) -> None:
    """Copy ``length`` bytes at ``offset`` of ``source`` to the open file ``sink``, file to file
    (never through memory maps, so copying does not grow the resident set)."""
    sink.flush()
    with open(source, "rb") as src:
        remaining = length
        position = offset
        out_fd = sink.fileno()
        while remaining:
            try:
                done = os.copy_file_range(src.fileno(), out_fd, min(remaining, _CHUNK), position)
            except (AttributeError, OSError):
                done = 0
            if done <= 0:  # unsupported here, or the filesystem declined: plain reads
                src.seek(position)
                chunk = src.read(min(remaining, _CHUNK))
                if not chunk:
                    raise OSError(f"'{source.name}' ended early")
                os.write(out_fd, chunk)
                done = len(chunk)
            remaining -= done
            position += done
    sink.seek(0, os.SEEK_END)


Blocks = Callable[[], tuple[tuple[int, ...], Iterable[np.ndarray]]]
"""A tensor's new value produced on demand: (shape, arrays that concatenate along axis 0 to
the value, in the tensor's dtype). Lets a rescaled weight go from its source file to the
output file a few megabytes at a time."""


class _DataWriter:
    """Appends tensors to the external data file and returns the stubs that point to them."""

    def __init__(
        self, handle, location: str, base_dir: Path | None, generated: Mapping[str, Blocks]
    ) -> None:
        self.handle = handle
        self.location = location
        self.base_dir = base_dir
        self.generated = generated
        self.offset = 0

    def add(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        blocks = None
        if tensor.name in self.generated:
            shape, blocks = self.generated[tensor.name]()
            tensor = tensors.copy_metadata(tensor, shape)
        nbytes = tensors.expected_nbytes(tensor)
        start = _aligned(self.offset, nbytes)
        if start > self.offset:
            self.handle.write(b"\0" * (start - self.offset))
        if blocks is not None:
            _write_blocks(self.handle, tensor.name, blocks, nbytes)
        elif tensors.is_external(tensor):
            ref = tensors._checked_external(tensor, self.base_dir)
            _copy_range(ref.path, ref.offset, nbytes, self.handle)
        else:
            data = tensors.raw_bytes(tensor, self.base_dir)
            self.handle.write(data)
            del data
        self.offset = start + nbytes
        stub = tensors.copy_metadata(tensor)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", str(start)),
            ("length", str(nbytes)),
        ):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        return stub


def _write_blocks(handle, name: str, blocks: Iterable[np.ndarray], nbytes: int) -> None:
    written = 0
    behind = _WriteBehind(handle) if nbytes >= _WRITE_BEHIND_FROM else None
    write = handle.write if behind is None else behind.write
    with behind or contextlib.nullcontext():
        for block in blocks:
            written += write(tensors.raw_view(block))
    if written != nbytes:  # a producer bug, not the user's input
        raise RuntimeError(f"tensor '{name}': {written} bytes for {nbytes}")


_WRITE_BEHIND_BYTES = 4 * 2**20
_WRITE_BEHIND_FROM = 4 * _WRITE_BEHIND_BYTES  # below, a thread and its buffers cost more


class _WriteBehind:
    """Bytes gathered into a few megabytes at a time and written by a thread, so computing the
    next blocks (rescaling, numpy without the GIL) overlaps the write of the last ones (the
    kernel's copy into the page cache): on one core each, a 2 GiB float16 model's produced
    weights took 4.3 s to compute and 4.9 s to write, one after the other.

    Two buffers take turns. A write error is raised in the caller's thread at its next
    :meth:`write` or on leaving the block; leaving it by an exception or an interrupt lets the
    write under way finish (signals held, as in cleanup) and writes nothing more.
    """

    def __init__(self, handle) -> None:
        self._handle = handle
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._free.put(bytearray(_WRITE_BEHIND_BYTES))
        self._buffer, self._filled = bytearray(_WRITE_BEHIND_BYTES), 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="onnxbalance-write", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, length = item
            if self._error is None:
                try:
                    self._handle.write(memoryview(buffer)[:length])
                except BaseException as exc:  # raised again in the caller's thread
                    self._error = exc
            self._free.put(buffer)

    def write(self, data: memoryview) -> int:
        """Queue ``data`` (bytes); return how many."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            room = min(len(view) - done, _WRITE_BEHIND_BYTES - self._filled)
            self._buffer[self._filled : self._filled + room] = view[done : done + room]
            self._filled += room
            done += room
            if self._filled == _WRITE_BEHIND_BYTES:
                self._hand_over()
        return done

    def _hand_over(self) -> None:
        self._full.put((self._buffer, self._filled))
        self._buffer, self._filled = self._free.get(), 0
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        with signals_deferred():
            if exc_type is None and self._filled:
                self._full.put((self._buffer, self._filled))
            self._full.put(None)
            self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


def inline_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> onnx.TensorProto:
    """``tensor`` itself when inline, else an inline copy of it (raw bytes read from its file)."""
    if not tensors.is_external(tensor):
        return tensor
    stub = tensors.copy_metadata(tensor)
    stub.raw_data = bytes(tensors.raw_bytes(tensor, base_dir))
    return stub


class _BackgroundSync:
    """``fsync`` of a finished file, run in a thread so that it overlaps whatever the caller
    does before committing (verification); :meth:`wait` re-raises its error. The file must be
    fully written and closed first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="onnxbalance-fsync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem: the renames still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _source_files(model: onnx.ModelProto, base_dir: Path | None) -> set[Path]:
    files = set()
    for tensor in tensors.iter_tensors(model):
        if tensors.is_external(tensor):
            files.add(tensors.external_ref(tensor, base_dir).path)
    return files


class Staged:
    """A complete output written under a hidden temporary folder beside its destination.

    ``model_path`` can be opened (by onnxruntime, for verification) exactly as the final file:
    its external data sits next to it under its final name. :meth:`commit` moves both into
    place, data first; :meth:`discard` (or leaving the ``with`` block without committing)
    removes everything. Used as a context manager it never leaves temporaries behind.
    """

    def __init__(
        self, out: Path, folder: Path, final_data: Path | None, kept: Iterable[Path] = ()
    ) -> None:
        self.out = out
        self.folder = folder
        self.model_path = folder / out.name
        self.final_data = final_data
        self.data_path = folder / final_data.name if final_data is not None else None
        self.committed = False
        self._kept = {Path(p).resolve() for p in kept}
        self._syncs: list[_BackgroundSync] = []
        # whatever becomes of this object (dropped by an interrupt before a caller's ``with``,
        # or alive at exit), the folder goes with it
        self._folder_removal = weakref.finalize(self, _remove_folder, folder)

    def _sync_later(self, path: Path) -> None:
        self._syncs.append(_BackgroundSync(path))

    def _wait_synced(self) -> None:
        """Every staged file is on disk (not just in the page cache) before it is renamed in."""
        syncs, self._syncs = self._syncs, []
        errors = []
        for sync in syncs:
            try:
                sync.wait()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def commit(self) -> Path | None:
        """Move the output into place; return the final external data path, if any.

        The data file's name is one no file had (:func:`fresh_data_path`), so until the model
        is renamed an existing OUT still finds its own data: the model's rename is the commit.
        """
        final_data = self.final_data
        old_data = _replaced_data_files(self.out)
        try:
            self._wait_synced()
            _pause_for_tests()
            # an interrupt waits until the renames and the removal of what they replaced are
            # done: once the model is renamed the output is complete (discard, below, holds
            # signals itself)
            with signals_deferred():
                if self.data_path is not None:
                    os.replace(self.data_path, final_data)
                os.replace(self.model_path, self.out)
                self.committed = True
                _COMMITTED.add(self.out.absolute())
                _fsync_dir(self.out.parent if str(self.out.parent) else Path("."))
                self._remove_replaced(old_data)
        except OSError as exc:
            raise OutputError(f"cannot write '{self.out}': {exc.strerror or exc}") from exc
        finally:
            if not self.committed and final_data is not None:  # renamed, but not referenced
                with contextlib.suppress(OSError):
                    os.unlink(final_data)
            self.discard()
        return final_data

    def _remove_replaced(self, old_data: set[Path]) -> None:
        """Remove the replaced model's data files (only names this module gives OUT's data),
        never the new one, the input's or another protected file."""
        for path in old_data:
            resolved = path.resolve()
            if resolved in self._kept or (
                self.final_data is not None and resolved == self.final_data.resolve()
            ):
                continue
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove the replaced data file %s: %s", path, exc)

    def discard(self) -> None:
        # a second signal must not leave the staging folder behind half removed
        with signals_deferred():
            with contextlib.suppress(OSError):
                self._wait_synced()
            self._folder_removal()

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _remove_folder(folder: Path) -> None:
    try:
        folder.rmdir()  # committed: nothing left inside
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)


def _check_destination(out: Path) -> Path:
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputError(f"output '{out}' is a directory; give a file name")
    if not folder.is_dir():
        raise OutputError(f"output folder '{folder}' does not exist")
    return folder


def stage_model(
    model: onnx.ModelProto,
    out: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    external: Iterable[str] | None = None,
    protected: Iterable[str | os.PathLike] = (),
    generated: Mapping[str, Blocks] | None = None,
    durable: bool = True,
) -> Staged:
    """Write the complete output (model and data) under a temporary folder beside ``out``.

    Arguments as for :func:`save_model`; ``generated`` gives tensors whose values are produced
    while writing (:data:`Blocks`), by name, instead of read from ``model``. Nothing at ``out``
    changes until :meth:`Staged.commit`. ``durable=False``: the files are read once and removed
    (a scratch copy), so they are never flushed to the disk.

    Raises:
        OutputError: the destination cannot be written, or is one of the input's data files.
    """
    out = Path(out)
    base = Path(base_dir) if base_dir is not None else None
    folder = _check_destination(out)
    names, moved = _choose_external(model, external)
    if moved:
        log.warning(
            "%d tensors moved to external data: inline they exceed protobuf's 2 GB limit",
            len(moved),
        )
    sources = _source_files(model, base)
    kept = {Path(p).resolve() for p in protected} | sources
    final_data = None
    if names:
        if out.resolve() in sources:
            raise OutputError(
                f"output '{out.name}' is the input's external data file; "
                "choose another output name or folder"
            )
        final_data = fresh_data_path(out, avoid=kept)
    remove_stale_staging(out)
    token = f"{_staging_key(out)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    # the object owns the folder before the folder exists: no moment has one without the other
    staged = Staged(out, folder / f"{_STAGING_PREFIX}{token}", final_data, kept)
    generated = dict(generated or {})
    produced: dict[str, tuple[Iterable[np.ndarray], int]] = {}

    def inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
        """An inline tensor; one produced by ``generated`` is a stub, its data written later."""
        if tensor.name not in generated:
            return inline_tensor(tensor, base)
        if tensor.name in produced:  # only main-graph initializers are produced
            raise RuntimeError(f"tensor '{tensor.name}' is stored twice")
        shape, blocks = generated[tensor.name]()
        stub = tensors.copy_metadata(tensor, shape)
        produced[tensor.name] = blocks, tensors.expected_nbytes(stub)
        return stub

    try:
        staged.folder.mkdir()
        if staged.data_path is not None:
            with open(staged.data_path, "xb") as handle:
                writer = _DataWriter(handle, staged.data_path.name, base, generated)
                skeleton = protos.map_tensors(
                    model, lambda t: writer.add(t) if t.name in names else inline(t)
                )
            if durable:
                staged._sync_later(staged.data_path)
        elif generated or any(tensors.is_external(t) for t in tensors.iter_tensors(model)):
            skeleton = protos.map_tensors(model, inline)
        else:  # every tensor already inline and final: serialise the model itself, no copy
            skeleton = model
        try:
            pieces = protos.serialized_pieces(
                skeleton, {name: nbytes for name, (_, nbytes) in produced.items()}
            )
        except ValueError as exc:  # the graph itself is over protobuf's limit
            raise OutputError(f"cannot write '{out}': {exc}") from exc
        del skeleton
        with open(staged.model_path, "xb") as handle:
            for piece in pieces:
                if isinstance(piece, str):
                    _write_blocks(handle, piece, *produced.pop(piece))
                else:
                    handle.write(piece)
        if durable:
            staged._sync_later(staged.model_path)
    except OSError as exc:
        staged.discard()
        raise OutputError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    except BaseException:
        staged.discard()
        raise
    return staged


def save_model(
    model: onnx.ModelProto,
    out: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    external: Iterable[str] | None = None,
    protected: Iterable[str | os.PathLike] = (),
) -> Path | None:
    """Write ``model`` to ``out`` atomically; return the external data file written, if any.

    Args:
        model: the model; tensors may still reference external data under ``base_dir`` (a
            model loaded with ``load_external_data=False``). It is not modified.
        out: destination model path. Its data file, when needed, is ``out.name + ".data"``
            (``out.name + ".N.data"`` when that name is taken: :func:`fresh_data_path`).
        base_dir: folder the model's external references are relative to.
        external: names of the tensors to store externally (the input's layout, see
            :func:`onnxbalance.tensors.external_names`); None keeps each tensor's storage.
        protected: further files that must not be overwritten (the input model).

    Raises:
        OutputError: the destination cannot be written, or is one of the input's data files.
    """
    staged = stage_model(model, out, base_dir=base_dir, external=external, protected=protected)
    return staged.commit()
