"""Where finetune keeps what it makes once and reuses (converted models, prepared data, built wheels), and how it
writes what it makes: whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import UserError

#: The file that makes a directory a finetune run directory (written when the run dir is claimed, before anything
#: else): what every command recognises a run by, since the other files of a run may be missing or removed.
RUN_INFO = "run.json"


def cache_dir() -> Path:
    """`$FINETUNE_CACHE`, else ~/.cache/finetune (the XDG cache folder most ML tools share)."""
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser()


#: The file inside an output directory that finetune is still writing (a merged model, an export's scratch): its
#: presence marks the directory partial, and it names the command that finishes or replaces it. Directories are
#: written under a temporary sibling name and renamed into place when complete, so only a killed command leaves one.
PARTIAL_MARKER = "finetune-partial.json"
#: The temporary sibling of OUTPUT is `.OUTPUT.partial-PID`: same directory, so the final rename stays on one
#: filesystem, and the writer's pid, so a later run can tell a killed writer's leftover from a live one.
PARTIAL_INFIX = ".partial"


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it. The temporary's name is fixed,
    so a killed write leaves at most one, which the next write of the same file replaces."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def partial_output(path: Path, command: str, log: Callable = print, publish: bool = True) -> Iterator[Path]:
    """A directory written under `.NAME.partial-PID` beside `path`, marked partial (PARTIAL_MARKER: `command`, start
    time, pid) until the block succeeds; then the mark goes and it is renamed to `path` (`publish`), or removed (a
    scratch directory). An exception removes it. Leftovers of earlier killed writers of `path` are removed first,
    each said in one line. `path` must be absent or an empty directory (`check_output_dir`)."""
    path = Path(path)
    if publish:
        check_output_dir(path, command)
    remove_leftovers(path, log)
    temporary = path.parent / f".{path.name}{PARTIAL_INFIX}-{os.getpid()}"
    temporary.mkdir(parents=True)
    with _terminate_as_interrupt():
        try:
            marker = {"command": command, "started": time.time(), "pid": os.getpid()}
            write_atomic(temporary / PARTIAL_MARKER, json.dumps(marker, indent=2) + "\n")
            yield temporary
            if publish:
                (temporary / PARTIAL_MARKER).unlink()
                _publish(temporary, path)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler's stop) taken as Ctrl-C while an output is written: the command stops with its
    interrupt message and removes its temporary, instead of dying at once and leaving it for the next run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # signals go to the main thread; a handler someone installed (training's own) is theirs
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _publish(temporary: Path, path: Path) -> None:
    _usual_modes(temporary)
    try:
        os.replace(temporary, path)  # over an empty directory too; never over a non-empty one
    except OSError as err:
        raise UserError(f"{path} was filled by another process while finetune wrote it ({err.strerror}); nothing "
                        "of this run was kept there. Choose another --output, or remove it and run again") from None


def _usual_modes(directory: Path) -> None:
    """Files some writers create owner-only (safetensors writes through a 0600 temporary) get the mode every other file
    of the output has (0666 less the umask), so other users and containers can read a merged model."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.rglob("*"):
        if file.is_file() and not file.is_symlink() and not file.stat().st_mode & 0o077:
            file.chmod(0o666 & ~umask)


def check_output_dir(path: Path, command: str | None = None) -> None:
    """Refuse, before anything is written, an output that is a file, a partial output of an earlier command (named
    with the command that replaces it: its own, else `command`), or a directory with anything in it: finetune never
    replaces what it was not asked to."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; choose another --output (nothing was written)")
    marker = path / PARTIAL_MARKER
    if marker.is_file():
        found = read_marker(marker)
        command = found.get("command") or command or "the finetune command that wrote it"
        raise UserError(f"{path} is a partial output of `{_program(command)}`: it carries {PARTIAL_MARKER}, so that "
                        f"command stopped before it finished{_when(found)}, and nothing in it is usable. Remove it "
                        f"and run it again: rm -r {path} && {command}")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path} is not empty; choose another --output (nothing was written)")


def read_marker(marker: Path) -> dict:
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _program(command: str) -> str:
    """`finetune merge` from a whole command line: the command a partial output belongs to."""
    return " ".join(command.split()[:2])


def _when(marker: dict) -> str:
    started = marker.get("started")
    if not isinstance(started, (int, float)):
        return ""
    return f" (started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}, pid {marker.get('pid')})"


def remove_leftovers(path: Path, log: Callable = print) -> None:
    """Remove the temporaries of `path` that killed writers left (`.NAME.partial-PID` whose process is gone, or an
    older finetune's `.NAME.partial`), saying what each was and how much room it freed. A live writer's is kept."""
    prefix = f".{path.name}{PARTIAL_INFIX}"
    siblings = sorted(path.parent.glob(f"{_glob_escape(prefix)}*")) if path.parent.is_dir() else []
    for leftover in siblings:
        pid = leftover.name[len(prefix) + 1:] if leftover.name.startswith(f"{prefix}-") else ""
        if leftover.name != prefix and not pid.isdigit():
            continue  # another output's name that happens to start the same way
        marker = read_marker(leftover / PARTIAL_MARKER)
        if pid and _writer_alive(int(pid), marker.get("started")):
            log(f"[yellow]leaving {leftover}: process {pid} is still writing {path.name} there[/yellow]")
            continue
        remove_leftover(leftover, f"left by `{marker.get('command') or 'finetune'}`, which was stopped before it "
                                  "finished", log)


def remove_leftover(leftover: Path, why: str, log: Callable = print) -> None:
    size = directory_bytes(leftover) if leftover.is_dir() else leftover.stat().st_size
    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
    else:
        leftover.unlink(missing_ok=True)
    log(f"[yellow]removed {leftover} ({human_size(size)}): {why}[/yellow]")


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _writer_alive(pid: int, started: float | None) -> bool:
    """Whether `pid` may still be the writer: it exists, is not a zombie, and (where /proc says) did not start after
    the temporary was made, which would make it another process that got the pid again."""
    if pid == os.getpid():
        return False  # this process is about to write the same output, so it is not writing that one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return True
    began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0] != "Z" and not (isinstance(started, (int, float)) and began > started + 2)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def human_size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def die_with_parent() -> None:
    """For `subprocess`'s preexec_fn: the child gets SIGKILL when finetune dies (Linux's PR_SET_PDEATHSIG), so a
    killed command leaves no converter still writing into the temporary that the next run removes."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent, as before
        pass
