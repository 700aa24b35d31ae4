"""The run directory: claimed without losing anything, used by one process at a time, checkpoints complete or
ignored, and a run.json that says what the directory holds.

- A run dir carries `run.json` from the moment it is claimed (status `running`, then `complete`,
  `interrupted`, `diverged` or `failed`). `--overwrite` only ever empties a directory with that mark, or an empty
  one, so a mistyped `--output ~/thesis` cannot delete a user's files.
- One process per run dir: an exclusive `flock` on `.finetune.lock`. The kernel drops it when the process dies,
  so a killed run never leaves the directory stuck.
- A checkpoint is complete when `finetune-complete.json` lists its files with their sizes. The mark is written
  after the trainer has written everything (its `on_save` event), so a checkpoint cut short by a kill or a full
  disk has none and `--resume` passes over it, saying so.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.errors import RunStopped, UserError
from finetune.paths import RUN_INFO, directory_bytes, human_size, write_atomic

LOCK = ".finetune.lock"
COMPLETE = "finetune-complete.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

#: Recipe fields a resumed run may change: they decide how long it runs and how often it logs, evaluates and
#: saves, not what it computes. Every other difference would make the resumed run a different run than the one
#: its checkpoint came from (weights, optimizer state, data order, schedule), so it is refused.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.save_total_limit", "train.output_dir", "distributed.machine_rank", "distributed.main_process_ip",
    "distributed.main_process_port",
)

_held_locks: dict[Path, Any] = {}  # open lock files: a lock lives as long as its file stays open


#: Files finetune itself may leave in a run dir before its run.json exists (a claim cut short): not the user's.
OWN_FILES = (LOCK, f".{RUN_INFO}.tmp")
#: What a run dir holds before the first training step (killed while preparing data or loading the model): a new run
#: of the same dir writes all of it again, so it is started again without --overwrite.
BEFORE_FIRST_STEP = {RUN_INFO, "recipe.yaml", "held_out.jsonl", ".held_out.jsonl.tmp", ".recipe.yaml.tmp"}


def claim(run_dir: Path, recipe: dict, overwrite: bool, resume: bool, log=print,
          inputs: tuple[str, ...] = ()) -> str | None:
    """Make `run_dir` this process's run dir; return the checkpoint to resume from (None for a new run).

    Refuses, before anything is written, a path that is a file or a directory a run must never use, a non-empty
    directory finetune did not create, a directory another process is training in, an `--overwrite` that would
    delete the run's own `inputs` (its base model or data), and a resume whose recipe changed in a way the run
    cannot continue with, or whose checkpoint is past `train.max_steps`."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    _check_location(run_dir)
    try:
        return _claim(run_dir, recipe, overwrite, resume, log, inputs)
    except OSError as err:  # a read-only or full volume, no permission, a path through a file
        raise UserError(f"cannot use {run_dir} as the run directory: {err.strerror or err} "
                        f"({err.filename or run_dir}); pick another --output") from None


def _claim(run_dir: Path, recipe: dict, overwrite: bool, resume: bool, log, inputs: tuple[str, ...]) -> str | None:
    if resume:
        if not is_run_dir(run_dir):
            raise UserError(f"--resume: {run_dir} is not a finetune run directory (no {RUN_INFO}), so there is no "
                            "checkpoint to resume")
        _lock(run_dir)
        check_resume_changes(run_dir, recipe, log)
        checkpoint = last_complete_checkpoint(run_dir / "checkpoints", log, remove_incomplete=True)
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; nothing to resume. "
                            "Start again with --overwrite")
        step, max_steps = checkpoint_step(checkpoint), (recipe.get("train") or {}).get("max_steps")
        if max_steps and step > max_steps:
            raise UserError(f"--resume: the newest checkpoint ({Path(checkpoint).name}) is past train.max_steps "
                            f"{max_steps}; a run cannot go back. Set train.max_steps to {step} or more")
        return checkpoint
    entries = sorted(e for e in run_dir.iterdir() if e.name not in OWN_FILES) if run_dir.is_dir() else []
    if entries and not is_run_dir(run_dir):
        _refuse_if_locked(run_dir)
        shown = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise UserError(f"{run_dir} holds files finetune did not write ({shown}{more}) and no {RUN_INFO}, so it is "
                        "not a run directory; only a run directory finetune created is replaced. Nothing was "
                        "deleted; pick another --output")
    if entries and not overwrite and {e.name for e in entries} <= BEFORE_FIRST_STEP:
        _refuse_if_locked(run_dir)  # a live run still preparing is refused like any other
        info = read_run_info(run_dir)
        log(f"{run_dir}: the run started there {info.get('started', '')} stopped before its first step (status "
            f"{info.get('status', 'unknown')}: no checkpoint, weights or metrics), so there is nothing to keep; "
            "starting it again")
    elif entries and not overwrite:
        _refuse_if_locked(run_dir)
        raise UserError(f"run dir {run_dir} is not empty; pass --overwrite to replace it, --resume to continue it, "
                        "or --output to pick another directory")
    inside = [path for path in inputs if _is_within(Path(path), run_dir)]
    if entries and inside:
        raise UserError(f"--overwrite: the recipe reads {', '.join(inside)} from inside {run_dir}, which "
                        "--overwrite would delete first. Copy it out of the run dir, or pick another --output. "
                        "Nothing was deleted")
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    for entry in entries:  # the lock file stays: it is what keeps a second process out while we clear
        if entry.name != LOCK:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    write_run_info(run_dir, finetune_version=__version__, status="running",
                   started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    return None


def _check_location(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} is a file, not a directory; pick a directory for the run")
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if resolved in (Path.home().resolve(), cwd, *cwd.parents):
        raise UserError(f"--output {run_dir} is {resolved}: the home directory, the current directory or one of "
                        "its parents cannot be a run directory; pick a subdirectory such as runs/my-run")


def _is_within(path: Path, directory: Path) -> bool:
    path, directory = path.expanduser().resolve(), directory.resolve()
    return path == directory or directory in path.parents


def is_run_dir(path: Path) -> bool:
    return "finetune_version" in read_run_info(path, missing_ok=True)


def _lock(run_dir: Path) -> None:
    import fcntl

    key = run_dir.resolve()
    if key in _held_locks:
        return
    handle = (run_dir / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"run dir {run_dir} is in use by another finetune process (pid {owner}); wait for it to "
                        "finish, stop it, or pick another --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle


def _refuse_if_locked(run_dir: Path) -> None:
    if (run_dir / LOCK).exists() and run_dir.resolve() not in _held_locks:
        _lock(run_dir)  # raises when another process holds it
        release(run_dir)


def release(run_dir: Path) -> None:
    handle = _held_locks.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()


# --- run.json ---------------------------------------------------------------------------------------------------

def read_run_info(run_dir: Path, missing_ok: bool = False) -> dict:
    path = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise UserError(f"{run_dir}: not a run directory (no {RUN_INFO})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if missing_ok:
            return {}
        raise UserError(f"{path}: not valid JSON ({err}); the run directory is damaged") from None
    return info if isinstance(info, dict) else {}


def finished_run(run_dir: Path) -> dict | None:
    """run.json of a run whose final weights are there; None when `run_dir` is not a run directory. A run that has
    not finished (interrupted, diverged, failed) is refused with its status and how to go on, rather than failing
    later on a missing key or directory."""
    if not (Path(run_dir) / RUN_INFO).is_file():
        return None
    info = read_run_info(run_dir)
    if info.get("artifact") not in ("adapter", "model"):
        status = info.get("status", "unknown")
        if status == "diverged":
            advice = f"it diverged ({info.get('reason', 'see run.json')}); change the recipe and train again"
        else:
            advice = "to finish it: " + (info.get("resume_command") or
                                         f"finetune train {run_dir / 'recipe.yaml'} --output {run_dir} --resume")
        raise UserError(f"{run_dir}: the run has no final weights (run.json status: {status}); they are saved when "
                        f"training finishes. {advice[0].upper()}{advice[1:]}")
    weights = Path(run_dir) / info["artifact"]
    if not weights.is_dir():
        raise UserError(f"{weights}: missing, so the run has no final weights (run.json says it saved its "
                        f"{info['artifact']} there). Restore the directory, or train again.")
    return info


def write_run_info(run_dir: Path, drop: tuple[str, ...] = (), **fields) -> dict:
    """Merge `fields` into run.json (less the keys in `drop`), written whole or not at all (a temporary file
    renamed over it)."""
    info = {k: v for k, v in read_run_info(run_dir, missing_ok=True).items() if k not in drop} | fields
    write_atomic(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
    return info


def weights_hash(model_dir: str) -> str | None:
    """sha256 over a local checkpoint's weight files, so `merge` can prove it found the same base."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# --- checkpoints ------------------------------------------------------------------------------------------------

def mark_complete(checkpoint: Path, step: int) -> None:
    files = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*")) if f.is_file()
             and f.name != COMPLETE}
    write_atomic(checkpoint / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete."""
    try:
        mark = json.loads((checkpoint / COMPLETE).read_text())
    except FileNotFoundError:
        return "no completion mark: the process stopped (or the disk filled) while writing it"
    except json.JSONDecodeError:
        return "its completion mark is damaged"
    for name, size in mark["files"].items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """Checkpoint directories, newest (highest step) first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def last_complete_checkpoint(checkpoints: Path, log=print, remove_incomplete: bool = False) -> str | None:
    """The newest complete checkpoint; incomplete ones newer than it are reported (and removed when asked:
    they hold nothing usable, take disk space, and the trainer would write the same step into them again)."""
    for checkpoint in checkpoint_dirs(checkpoints):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return str(checkpoint)
        if remove_incomplete:
            shutil.rmtree(checkpoint)
        log(f"[yellow]{'removed' if remove_incomplete else 'skipping'} incomplete {checkpoint}: {reason}[/yellow]")
    return None


def write_failure(path: Path, cause: BaseException, run_dir: Path, resume_command: str, rank: int) -> RunStopped:
    """One message for a checkpoint or final model that could not be written: where, why, how much room it takes,
    and what is still usable. The partial directory is removed (it holds nothing resumable and uses the space)."""
    newest = last_complete_checkpoint(run_dir / "checkpoints", log=lambda *_: None)
    written = directory_bytes(path)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        write_run_info(run_dir, status="failed")
    free = shutil.disk_usage(run_dir).free
    needed = directory_bytes(Path(newest)) if newest else written
    size = (f"about {human_size(needed)} (the size of {Path(newest).name})" if newest
            else f"more than the {human_size(written)} written before the failure")
    # torch's zip writer reports a full disk as "unexpected pos ..." or "file write failed", with no errno.
    why = "the disk is full" if free < needed else "the write failed"
    then = (f"{Path(newest).name} is complete and untouched: make room, then continue with: {resume_command}"
            if newest else "no complete checkpoint exists yet: make room and start the run again with --overwrite")
    return RunStopped(f"could not write {path}: {why} ({cause}). A checkpoint of this run needs {size}; "
                      f"{human_size(free)} is free on that disk now. The partial {path.name} was removed; {then}")


def checkpoint_step(checkpoint: str) -> int:
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


# --- resuming against a changed recipe ---------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


UNSET = "(unset)"


def recipe_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs; a key only one side has shows `UNSET` on the other.
    When the method itself changed, its options are one change, not one per option of either method."""
    before, after = flatten(old), flatten(new)
    # A setting the schema gained after the run started is in its recipe.yaml as nothing, and now at its unset
    # default (None): the same setting, not a change.
    changes = {key: (before.get(key, UNSET), after.get(key, UNSET)) for key in sorted(before.keys() | after.keys())
               if before.get(key, UNSET) != after.get(key, UNSET) and not (key not in before and after[key] is None)}
    if "method.name" in changes:
        changes = {k: v for k, v in changes.items() if not k.startswith("method.") or k == "method.name"}
    return changes


def check_resume_changes(run_dir: Path, recipe: dict, log=print) -> dict[str, tuple[Any, Any]]:
    """Refuse, listing each, the differences from the run's recipe.yaml that a resumed run cannot honour; show the
    ones it can. Returns the accepted changes."""
    import yaml

    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise UserError(f"--resume: {saved} is missing, so the checkpoint cannot be matched to a recipe")
    changes = recipe_changes(yaml.safe_load(saved.read_text()) or {}, recipe)
    # `eval` runs after training, so a resumed run may score other benchmarks.
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES and not k.startswith("eval.")}
    if refused:
        lines = "\n".join(f"  - {key}: {old!r} in the run, {new!r} now" for key, (old, new) in refused.items())
        raise UserError(f"--resume: the recipe differs from the one {run_dir} was trained with, and a resumed run "
                        f"cannot honour these changes (its weights, optimizer state and schedule come from the "
                        f"checkpoint):\n{lines}\nResume with the original values, or start a new run with "
                        f"--output; only {', '.join(RESUMABLE_CHANGES[:6])} may change. Nothing was written.")
    for key, (old, new) in changes.items():
        log(f"resume: {key} {old!r} -> {new!r}")
    return changes
