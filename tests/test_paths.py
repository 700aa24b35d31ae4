"""finetune.paths: outputs written whole or not at all (a directory under a temporary sibling name, renamed into
place; a file through a temporary beside it), and the leftovers of killed writers found and removed."""

import json
import os
import subprocess
import sys
import time

import pytest

from finetune.errors import UserError
from finetune.paths import PARTIAL_MARKER, check_output_dir, partial_output, write_atomic


def leftover(parent, name, pid, started, size=1000):
    """A temporary as a killed writer leaves it: marked, with part of a model in it."""
    temporary = parent / f".{name}.partial-{pid}"
    temporary.mkdir()
    (temporary / PARTIAL_MARKER).write_text(json.dumps({"command": f"finetune merge run --output {parent / name}",
                                                        "started": started, "pid": pid}))
    (temporary / "model.safetensors").write_bytes(b"\0" * size)
    return temporary


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_completed_block_renames_the_temporary_into_place_without_its_mark(tmp_path):
    out = tmp_path / "merged"
    with partial_output(out, "finetune merge run --output merged", log=print) as temporary:
        assert temporary.parent == tmp_path and temporary.name == f".merged.partial-{os.getpid()}"
        marker = json.loads((temporary / PARTIAL_MARKER).read_text())
        assert marker["command"] == "finetune merge run --output merged" and marker["pid"] == os.getpid()
        assert abs(marker["started"] - time.time()) < 60
        (temporary / "model.safetensors").write_bytes(b"weights")
        (temporary / "model.safetensors").chmod(0o600)  # as safetensors leaves the file it writes
        (temporary / "private.key").write_bytes(b"")
        (temporary / "private.key").chmod(0o640)  # a mode someone chose is kept
        assert not out.exists()  # nothing at the final name until the block succeeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "private.key"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (out / "private.key").stat().st_mode & 0o777 == 0o640


def test_an_exception_leaves_nothing_behind(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt), partial_output(out, "finetune merge", log=print) as temporary:
        (temporary / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_scratch_directory_is_removed_even_when_it_succeeds(tmp_path):
    with partial_output(tmp_path / "x.gguf", "finetune export run", log=print, publish=False) as temporary:
        (temporary / "merged").mkdir()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_leftover_is_removed_and_reported_with_its_size(tmp_path):
    gone = leftover(tmp_path, "merged", dead_pid(), time.time() - 5, size=3_000_000)
    other = leftover(tmp_path, "merged-2", dead_pid(), time.time() - 5)  # another output's: not ours to remove
    said = []
    with partial_output(tmp_path / "merged", "finetune merge", log=said.append):
        assert not gone.exists()
    assert other.exists()
    assert len(said) == 1 and f"removed {gone} (3.0 MB)" in said[0] and "finetune merge run" in said[0]


def test_a_live_writers_temporary_is_kept_and_one_whose_pid_was_reused_is_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        writing = leftover(tmp_path, "live", sleeper.pid, time.time())
        said = []
        with partial_output(tmp_path / "live", "finetune merge", log=said.append):
            pass
        assert writing.exists() and "still writing" in said[0]
        writing.rename(reused := tmp_path / f".reused.partial-{sleeper.pid}")
        marker = reused / PARTIAL_MARKER
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "started": time.time() - 3600}))
        with partial_output(tmp_path / "reused", "finetune merge", log=said.append):
            assert not reused.exists()  # the process with that pid started after the temporary: not its writer
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_output_with_the_partial_mark_is_named_with_the_command_that_replaces_it(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / PARTIAL_MARKER).write_text(json.dumps({"command": "finetune merge runs/a --output merged --dtype bf16",
                                                  "started": time.time(), "pid": 12345}))
    (out / "model.safetensors").write_bytes(b"half")
    with pytest.raises(UserError) as refused:
        check_output_dir(out)
    message = str(refused.value)
    assert "partial output of `finetune merge`" in message and "pid 12345" in message
    assert f"rm -r {out} && finetune merge runs/a --output merged --dtype bf16" in message
    (out / PARTIAL_MARKER).unlink()
    with pytest.raises(UserError, match="is not empty"):
        check_output_dir(out)
    assert (out / "model.safetensors").read_bytes() == b"half"


def test_an_empty_output_directory_is_replaced(tmp_path):
    (tmp_path / "merged").mkdir()
    with partial_output(tmp_path / "merged", "finetune merge", log=print) as temporary:
        (temporary / "config.json").write_text("{}")
    assert (tmp_path / "merged" / "config.json").is_file()


def test_a_file_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_atomic(path, "old\n")

    def full_disk(_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, "new " * 1000)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_sigterm_while_writing_removes_the_temporary_like_ctrl_c(tmp_path):
    import signal

    out = tmp_path / "merged"
    script = ("import time; from pathlib import Path; from finetune.paths import partial_output\n"
              f"with partial_output(Path({str(out)!r}), 'finetune merge run --output merged', log=print) as t:\n"
              "    (t / 'model.safetensors').write_bytes(b'weights'); print('writing', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".merged.partial-*"))) == 1
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in err  # the CLI turns it into its interrupt message and exit 130
    assert list(tmp_path.iterdir()) == []  # no temporary, no output
