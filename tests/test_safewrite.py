"""Atomic, streaming, deterministic model writes (onnxbalance.safewrite)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp_models import mlp, save

from onnxbalance import safewrite, tensors
from onnxbalance.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _outputs(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    return session.run(None, {"x": x})[0]


def _lazy(tmp_path, threshold=0):
    path = save(mlp(), tmp_path / "in" / "m.onnx", external=True, threshold=threshold)
    return onnx.load(path, load_external_data=False), path


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def test_external_written_next_to_out_and_input_untouched(folders):
    model, path = _lazy(folders)
    before = _digest(path.parent)
    out = folders / "out" / "b.onnx"
    data = safewrite.save_model(model, out, base_dir=path.parent)
    assert data == folders / "out" / "b.onnx.data"
    assert sorted(os.listdir(out.parent)) == ["b.onnx", "b.onnx.data"]
    assert _digest(path.parent) == before
    np.testing.assert_array_equal(_outputs(out), _outputs(path))
    stored = onnx.load(out, load_external_data=False)
    for tensor in stored.graph.initializer:
        assert tensors.is_external(tensor)
        location = {e.key: e.value for e in tensor.external_data}["location"]
        assert location == "b.onnx.data"  # relative: the output folder can be moved


def test_inline_stays_inline(folders):
    path = save(mlp(), folders / "in" / "m.onnx")
    model = onnx.load(path, load_external_data=False)
    out = folders / "out" / "b.onnx"
    assert safewrite.save_model(model, out, base_dir=path.parent) is None
    assert os.listdir(out.parent) == ["b.onnx"]
    assert not tensors.external_names(onnx.load(out, load_external_data=False))
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_layout_is_kept_per_tensor(folders):
    # threshold 100 bytes: the 4x8 weight (128 B) is external, the biases (<= 32 B) inline
    model, path = _lazy(folders, threshold=100)
    layout = tensors.external_names(model)
    assert layout and layout != {t.name for t in model.graph.initializer}
    full = onnx.load(path)  # everything in memory: a rewritten model looks like this
    out = folders / "out" / "b.onnx"
    safewrite.save_model(full, out, base_dir=path.parent, external=layout)
    assert tensors.external_names(onnx.load(out, load_external_data=False)) == layout
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def _with_data_named(path: Path, location: str) -> onnx.ModelProto:
    """The model at ``path`` with its external data file renamed to ``location``."""
    os.rename(path.with_name("m.onnx.bin"), path.with_name(location))
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)
    return model


def test_input_data_named_like_the_outputs_is_never_written(folders):
    """IN's data file carries the name OUT's data would have: OUT's data takes the next free
    name, and replacing that output later removes its old data file, never IN's."""
    path = save(mlp(), folders / "in" / "m.onnx", external=True)
    model = _with_data_named(path, "b.onnx.data")
    before = _digest(path.parent)
    out = path.parent / "b.onnx"
    assert safewrite.save_model(model, out, base_dir=path.parent) == out.with_name("b.onnx.1.data")
    np.testing.assert_array_equal(_outputs(out), _outputs(path))
    assert safewrite.save_model(model, out, base_dir=path.parent) == out.with_name("b.onnx.2.data")
    assert sorted(os.listdir(path.parent)) == ["b.onnx", "b.onnx.2.data", "b.onnx.data", "m.onnx"]
    np.testing.assert_array_equal(_outputs(out), _outputs(path))
    assert {k: v for k, v in _digest(path.parent).items() if k in before} == before
    with pytest.raises(OutputError, match="is the input's external data file"):
        safewrite.save_model(model, path.parent / "b.onnx.data", base_dir=path.parent)
    assert {k: v for k, v in _digest(path.parent).items() if k in before} == before


def test_the_model_rename_is_the_single_commit_point(folders, monkeypatch):
    """Replacing an output with external data: until the model file is renamed the old model
    finds its own, unchanged data (a crash between the renames cannot pair the old model with
    the new data); a failure at the model's rename leaves the folder as it was."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    old = mlp(seed=5)
    save(old, folders / "old.onnx", external=True)
    safewrite.save_model(onnx.load(folders / "old.onnx"), out, external={"W0", "W1", "b0"})
    old_outputs, before = _outputs(out), _digest(out.parent)
    staged = safewrite.stage_model(model, out, base_dir=path.parent)
    real_replace = os.replace
    seen = []

    def crash_at_model_rename(src, dst):
        seen.append(Path(dst).name)
        if Path(dst) == out:  # the data file is in place by now: the old model must still work
            np.testing.assert_array_equal(_outputs(out), old_outputs)
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_model_rename)
    with pytest.raises(OutputError, match="Input/output error"):
        staged.commit()
    assert seen == ["b.onnx.1.data", "b.onnx"]
    assert _digest(out.parent) == before and sorted(os.listdir(out.parent)) == sorted(before)
    monkeypatch.setattr(os, "replace", real_replace)
    assert safewrite.save_model(model, out, base_dir=path.parent) == out.with_name("b.onnx.1.data")
    assert sorted(os.listdir(out.parent)) == ["b.onnx", "b.onnx.1.data"]  # old data removed
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_an_inline_output_replacing_one_with_data_removes_its_data(folders):
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    safewrite.save_model(model, out, base_dir=path.parent)
    assert safewrite.save_model(model, out, base_dir=path.parent, external=()) is None
    assert os.listdir(out.parent) == ["b.onnx"]
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_stale_staging_folders_are_removed_by_the_next_run(folders):
    """A killed run (SIGKILL, power cut) leaves its staging folder; the next run on the same
    OUT removes it, while a live run's folder and other outputs' folders stay."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    key = safewrite._staging_key(out)
    stale = out.parent / f".onnxbalance-{key}-{int(dead.stdout)}-abc123"
    live = out.parent / f".onnxbalance-{key}-{os.getppid()}-abc123"
    other = out.parent / f".onnxbalance-{safewrite._staging_key(out.with_name('c.onnx'))}-1-ab"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "b.onnx.data").write_bytes(b"\0" * 1000)
    safewrite.save_model(model, out, base_dir=path.parent)
    assert sorted(os.listdir(out.parent)) == sorted(
        ["b.onnx", "b.onnx.data", live.name, other.name]
    )


def test_a_long_output_name_is_not_refused_for_the_staging_name(folders):
    """A 240-character name is legal (NAME_MAX is 255): staging names must not exceed it."""
    model, path = _lazy(folders)
    out = folders / "out" / ("n" * 235 + ".onnx")
    safewrite.save_model(model, out, base_dir=path.parent)
    assert sorted(os.listdir(out.parent)) == [out.name, out.name + ".data"]
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_a_second_signal_cannot_interrupt_cleanup(folders, monkeypatch):
    """SIGTERM arriving while the staging folder is being removed waits until it is gone."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    staged = safewrite.stage_model(model, out, base_dir=path.parent)
    real_rmtree = shutil.rmtree

    def signalled_rmtree(folder, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        real_rmtree(folder, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", signalled_rmtree)
    with pytest.raises(safewrite.Interrupted):
        with safewrite.interrupts_raise():
            staged.discard()
    assert os.listdir(out.parent) == []


def test_failure_midway_keeps_old_output_and_leaves_no_temporaries(folders, monkeypatch):
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    out.write_bytes(b"old model")
    safewrite.data_path_for(out).write_bytes(b"old data")
    before = _digest(out.parent)
    calls = []
    real_add = safewrite._DataWriter.add

    def failing_add(self, tensor):
        calls.append(tensor.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, tensor)

    monkeypatch.setattr(safewrite._DataWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        safewrite.save_model(model, out, base_dir=path.parent)
    assert _digest(out.parent) == before

    def disk_full(self, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safewrite._DataWriter, "add", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        safewrite.save_model(model, out, base_dir=path.parent)
    assert _digest(out.parent) == before


def test_existing_output_replaced_when_complete(folders):
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    out.write_bytes(b"old model")
    safewrite.save_model(model, out, base_dir=path.parent)
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_deterministic_bytes(folders):
    """Same model, same bytes; written over an existing output the data file takes the other
    name (the old model references the first until the new one replaces it), same bytes."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    safewrite.save_model(model, out, base_dir=path.parent)
    first = _digest(out.parent)
    again = folders / "again" / "b.onnx"
    again.parent.mkdir()
    safewrite.save_model(model, again, base_dir=path.parent)
    assert _digest(again.parent) == first
    safewrite.save_model(
        onnx.load(path), out, base_dir=path.parent, external=tensors.external_names(model)
    )
    second = _digest(out.parent)
    assert list(second) == ["b.onnx", "b.onnx.1.data"]
    assert second["b.onnx.1.data"] == first["b.onnx.data"]
    safewrite.save_model(model, out, base_dir=path.parent)
    assert _digest(out.parent) == first


def test_protobuf_limit_moves_largest_tensors_out(folders, monkeypatch, caplog):
    path = save(mlp(widths=(4, 64, 64, 3)), folders / "in" / "m.onnx")
    model = onnx.load(path)
    monkeypatch.setattr(safewrite, "INLINE_BUDGET", 10_000)  # stands in for 2 GB
    caplog.set_level(logging.WARNING, logger="onnxbalance.safewrite")
    out = folders / "out" / "b.onnx"
    assert safewrite.save_model(model, out, external=()) is not None
    moved = tensors.external_names(onnx.load(out, load_external_data=False))
    assert moved == {"W1"}  # 64x64 floats = 16 KB: the one tensor that had to go
    assert "2 GB" in caplog.text
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_large_tensors_are_aligned(folders, monkeypatch):
    monkeypatch.setattr(safewrite, "ALIGN_THRESHOLD", 64)
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    safewrite.save_model(model, out, base_dir=path.parent)
    for tensor in onnx.load(out, load_external_data=False).graph.initializer:
        info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
        if info["length"] >= 64:
            assert info["offset"] % safewrite.ALLOCATION_GRANULARITY == 0
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_bad_destinations(folders):
    model, path = _lazy(folders)
    with pytest.raises(OutputError, match="does not exist"):
        safewrite.save_model(model, folders / "nope" / "b.onnx", base_dir=path.parent)
    with pytest.raises(OutputError, match="directory"):
        safewrite.save_model(model, folders / "out", base_dir=path.parent)


_SAVER = """
import sys, onnx
from onnxbalance import safewrite
model = onnx.load(sys.argv[1], load_external_data=False)
try:
    with safewrite.interrupts_raise():
        safewrite.save_model(model, sys.argv[2], base_dir=sys.argv[3])
except KeyboardInterrupt as exc:
    sys.exit(128 + getattr(exc, "signum", 2))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_writing_leaves_nothing(folders, signum):
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    out.write_bytes(b"old model")
    before = _digest(out.parent)
    marker = folders / "paused"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env[safewrite._PAUSE_ENV] = f"{marker}:30"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(path), str(out), str(path.parent)], env=env
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    (temp,) = [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert sorted(os.listdir(temp)) == ["b.onnx", "b.onnx.data"]  # staged right now
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    assert _digest(out.parent) == before


def test_signals_deferred_during_commit():
    with pytest.raises(safewrite.Interrupted) as info:
        with safewrite.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            reached = True
    assert reached
    assert info.value.signum == signal.SIGTERM


def test_staged_output_opens_like_the_final_one(folders):
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    out.write_bytes(b"old model")
    with safewrite.stage_model(model, out, base_dir=path.parent) as staged:
        np.testing.assert_array_equal(_outputs(staged.model_path), _outputs(path))
        assert out.read_bytes() == b"old model"  # nothing final changed yet
    assert os.listdir(out.parent) == ["b.onnx"]  # discarded on leaving the block
    staged = safewrite.stage_model(model, out, base_dir=path.parent)
    assert staged.commit() == folders / "out" / "b.onnx.data"
    assert sorted(os.listdir(out.parent)) == ["b.onnx", "b.onnx.data"]
    np.testing.assert_array_equal(_outputs(out), _outputs(path))


def test_a_staged_output_never_entered_is_removed_with_its_object(folders):
    """An interrupt can land after staging and before the caller's ``with``: the object that
    staged the output is then dropped, and its folder goes with it."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    staged = safewrite.stage_model(model, out, base_dir=path.parent)
    assert staged.folder.is_dir() and staged.model_path.is_file()
    del staged
    assert os.listdir(out.parent) == []


def test_a_staged_output_still_held_at_exit_is_removed(folders):
    """...or, when a frame still holds it, at the interpreter's exit at the latest."""
    model, path = _lazy(folders)
    out = folders / "out" / "b.onnx"
    script = (
        "import sys, onnx\n"
        "from onnxbalance import safewrite\n"
        f"model = onnx.load({str(path)!r}, load_external_data=False)\n"
        f"held = safewrite.stage_model(model, {str(out)!r}, base_dir={str(path.parent)!r})\n"
        "print(held.folder.is_dir())\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "True\n", "")
    assert os.listdir(out.parent) == []


def _written_with(model, path, folders, layout, generated):
    """Stage and commit ``model`` with ``generated`` tensors (stored as the input stores them,
    or all inline); the output's path and its initializers by name."""
    out = folders / "out" / "b.onnx"
    external = None if layout == "external" else ()
    staged = safewrite.stage_model(
        model, out, base_dir=path.parent, external=external, generated=generated
    )
    staged.commit()
    return out, {t.name: t for t in onnx.load(out, load_external_data=False).graph.initializer}


@pytest.fixture
def small_write_behind(monkeypatch):
    """Buffers of 1000 bytes, used from 3000: every test tensor goes through many of them."""
    monkeypatch.setattr(safewrite, "_WRITE_BEHIND_BYTES", 1000)
    monkeypatch.setattr(safewrite, "_WRITE_BEHIND_FROM", 3000)


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "onnxbalance-write"]


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_large_generated_tensors_are_written_behind_byte_for_byte(
    folders, layout, small_write_behind
):
    """Blocks of uneven sizes cross the buffers' edges anywhere; a tensor below the threshold
    is written directly; the bytes are the same either way and no writer thread stays."""
    model, path = _lazy(folders)
    rng = np.random.default_rng(5)
    new_w0 = rng.standard_normal((8, 4)).astype(np.float32)
    big = rng.standard_normal((700, 9)).astype(np.float32)  # 25 200 bytes, 26 buffers
    cuts = np.sort(rng.choice(np.arange(1, 700), 40, replace=False))

    def w0():
        return (8, 4), iter([new_w0])

    def w1():  # W1 is 2x8 in the model: a new shape, as an expansion would give
        return big.shape, iter(np.split(big, cuts))

    out, written = _written_with(model, path, folders, layout, {"W0": w0, "W1": w1})
    np.testing.assert_array_equal(tensors.read_array(written["W1"], out.parent), big)
    np.testing.assert_array_equal(tensors.read_array(written["W0"], out.parent), new_w0)
    assert _writer_threads() == []


class _FailingFile:
    """A file whose disk fills after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room, self.data = room, bytearray()

    def write(self, data) -> int:
        if len(self.data) + len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.data += data
        return len(data)


def test_a_failed_write_behind_is_raised_in_the_caller(small_write_behind):
    blocks = [np.full(100, i, np.float32) for i in range(50)]  # 20 000 bytes
    sink = _FailingFile(room=5000)
    with pytest.raises(OSError, match="No space left"):
        safewrite._write_blocks(sink, "W", iter(blocks), 20_000)
    assert len(sink.data) == 5000  # whole buffers, in order, up to the failure
    assert bytes(sink.data) == b"".join(b.tobytes() for b in blocks)[:5000]
    assert _writer_threads() == []


def test_a_failing_producer_stops_the_write_behind(small_write_behind):
    def blocks():
        for i in range(30):
            yield np.full(100, i, np.float32)
        raise ValueError("float16 overflow")

    sink = _FailingFile(room=10**6)
    with pytest.raises(ValueError, match="overflow"):
        safewrite._write_blocks(sink, "W", blocks(), 20_000)
    assert len(sink.data) % 1000 == 0 and len(sink.data) <= 12_000  # nothing after it failed
    assert _writer_threads() == []


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_generated_tensors_are_streamed_in(folders, layout):
    """Values produced while writing replace the stored ones, in blocks, with a new shape."""
    model, path = _lazy(folders)
    new_w0 = np.arange(32, dtype=np.float32).reshape(8, 4) - 7
    new_b0 = np.full(8, 0.5, dtype=np.float32)

    def w0():
        return (8, 4), iter([new_w0[:3], new_w0[3:]])

    def b0():  # a scalar expanded to one entry per unit
        return (8,), iter([new_b0])

    out, written = _written_with(model, path, folders, layout, {"W0": w0, "b0": b0})
    assert tensors.is_external(written["W0"]) == (layout == "external")
    np.testing.assert_array_equal(tensors.read_array(written["W0"], out.parent), new_w0)
    np.testing.assert_array_equal(tensors.read_array(written["b0"], out.parent), new_b0)
    original = {t.name: t for t in model.graph.initializer}
    np.testing.assert_array_equal(
        tensors.read_array(written["W1"], out.parent),
        tensors.read_array(original["W1"], path.parent),
    )
