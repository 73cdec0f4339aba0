"""Checkpoint folders: their files (written, read back), checksum manifest, promotion into place,
choosing what to resume, and the rules for reusing an ``output_dir``. The training loop
(:mod:`icrm.loop`) orders the ranks around these; the files are this module's business.

A checkpoint is written into ``tmp-checkpoint-<step>/``; ``checksums.json`` (size and
SHA-256 of every other file) is written last, the folder is flushed to disk and renamed to
``checkpoint-<step>/`` in one ``os.replace``. Resume verifies the manifest, names the first
bad file, and falls back to the newest intact checkpoint (with a warning). A write that fails
(a full disk above all) removes the partial folder and ends in one :class:`IcrmError` line
(:func:`checkpoint_writing`).

``output_dir`` rules (:func:`prepare_output_dir`): a fresh run refuses a folder holding a
previous run's files unless ``overwrite_output_dir`` is set; then it deletes exactly the
files a run writes (:data:`RUN_FILES`, ``checkpoint-<N>`` folders that carry our
``trainer_state.json``, ``tmp-checkpoint-<N>`` and ``checkpoint-<N>.old`` leftovers,
``damaged-``/``superseded-checkpoint-<N>`` set aside by a resume, ``final/``; in ``icrm train``'s top
folder, the same inside its stage folders ``sft/``, ``bt/``, ``icrm/``, ... (``stages``)) and nothing else. A ``checkpoint-<N>`` or ``final`` folder that a run did not
write is never deleted: the run stops and names it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io_safety import IcrmError, ensure_writable_dir, first_line, fsync_tree

log = logging.getLogger("icrm")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "checksums.json"
#: Files a training run writes at the top of its ``output_dir`` (besides checkpoints and ``final/``).
RUN_FILES = ("metrics.jsonl", "training.png", "summary.json")


#: Prefixes of checkpoints moved aside on resume: damaged, or newer than an explicit resume point.
SET_ASIDE_PREFIXES = ("damaged-", "superseded-")


def _step_of(name: str) -> int | None:
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def checkpoint_step(path: str) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return _step_of(os.path.basename(os.path.normpath(path)))


def list_checkpoints(output_dir: str) -> list[str]:
    """Promoted checkpoints in ``output_dir``, oldest first (tmp folders are never listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _step_of(name) is not None and os.path.exists(os.path.join(path, TRAINER_STATE)):
            found.append((_step_of(name), path))
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------
# Manifest

def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(directory: str) -> None:
    """Record size and SHA-256 of every file in ``directory``; call it after the last file is written."""
    entries = {}
    for root, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST:
                entries[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    with open(os.path.join(directory, MANIFEST), "w") as fh:
        json.dump({"files": dict(sorted(entries.items()))}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(directory: str) -> str | None:
    """None if every file in the manifest is present and unchanged, else why not (naming the file)."""
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest):
        # Promotion is one rename after the manifest, so only a checkpoint from before
        # manifests lacks one; its files are still checked as they are read.
        log.warning("%s has no %s (written by an older icrm); its files are not checksum-verified", directory, MANIFEST)
        return None
    try:
        with open(manifest) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for rel, want in files.items():
        path = os.path.join(directory, rel)
        try:
            size = os.path.getsize(path)
            if size != want["size"]:
                return f"{path} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
            if _sha256(path) != want["sha256"]:
                return f"{path} does not match its SHA-256 in {MANIFEST} (corrupted)"
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as exc:
            return f"{path} cannot be read ({exc.strerror or exc})"
    return None


def promote(tmp: str, final: str) -> None:
    """Rename a complete ``tmp`` checkpoint to ``final``; an existing ``final`` (a step saved
    again after resuming from an older checkpoint) is swapped out first, then deleted."""
    if os.path.exists(final):
        trash = final + ".old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)


def set_aside(path: str, prefix: str) -> str:
    """Rename ``checkpoint-<N>`` to ``<prefix>checkpoint-<N>``: kept, never listed or resumed."""
    assert prefix in SET_ASIDE_PREFIXES
    target = os.path.join(os.path.dirname(os.path.normpath(path)), prefix + os.path.basename(os.path.normpath(path)))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    log.warning("moved %s aside to %s", path, target)
    return target


def remove_leftovers(output_dir: str) -> None:
    """Delete what a run killed mid-save leaves: ``tmp-checkpoint-*`` and ``checkpoint-*.old``."""
    for name in os.listdir(output_dir):
        if name.startswith(f"tmp-{CHECKPOINT_PREFIX}") or (name.startswith(CHECKPOINT_PREFIX) and name.endswith(".old")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ------------------------------------------------------------------------------------------
# What to resume

def resume_candidates(resume: str, output_dir: str) -> list[str]:
    """Checkpoint folders to try for ``resume_from_checkpoint``, best first.

    ``latest``: every checkpoint in ``output_dir``, newest first (an error if there is none);
    ``auto``: the same, or ``[]`` (start fresh, with a notice); a path: that folder only.
    """
    if resume in ("latest", "auto"):
        found = list_checkpoints(output_dir)[::-1]
        if not found:
            if resume == "latest":
                raise no_checkpoint_error(output_dir)
            log.warning("resume_from_checkpoint auto: no checkpoint in %s; starting from scratch", output_dir)
        return found
    if not os.path.isdir(resume):
        raise IcrmError(f"resume_from_checkpoint {resume}: no such checkpoint folder")
    return [resume]


def no_checkpoint_error(output_dir: str, stages: tuple[str, ...] = ()) -> IcrmError:
    """``resume_from_checkpoint latest`` found no checkpoint in ``output_dir`` (or its ``stages``
    folders): the error says the one thing that works from here, so the suggestions of this
    error and of :func:`prepare_output_dir` never send the user round in a circle."""
    where = f"{output_dir}/{{{','.join(stages)}}}" if stages else output_dir
    if _previous_run_entries(output_dir, stages)[0]:
        hint = ("the previous run there stopped before saving one, so there is nothing to continue; pass "
                "--overwrite_output_dir true instead of --resume_from_checkpoint to start it again")
    else:
        hint = "nothing to resume; drop --resume_from_checkpoint to start a fresh run"
    return IcrmError(f"resume_from_checkpoint latest: no checkpoint in {where}: {hint}")


# ------------------------------------------------------------------------------------------
# output_dir

def _is_ours(path: str) -> bool:
    """Whether ``path`` (a top-level entry of an ``output_dir``) is something a run writes."""
    name = os.path.basename(path)
    if os.path.isfile(path):
        return name in RUN_FILES
    if name.startswith((f"tmp-{CHECKPOINT_PREFIX}",) + tuple(p + CHECKPOINT_PREFIX for p in SET_ASIDE_PREFIXES)) or (
            name.startswith(CHECKPOINT_PREFIX) and name.endswith(".old")):
        return True
    if _step_of(name) is not None:
        return os.path.exists(os.path.join(path, TRAINER_STATE))
    if name == "final":
        return any(os.path.exists(os.path.join(path, f)) for f in ("icrm_reward_model.json", "config.json"))
    return False


def _previous_run_entries(output_dir: str, stages: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(ours, foreign)``: a previous run's entries, and same-named entries a run did not write
    (also inside the ``stages`` subfolders of a pipeline's ``output_dir``)."""
    ours, foreign = [], []
    if not os.path.isdir(output_dir):
        return ours, foreign
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name in stages and os.path.isdir(path):
            sub_ours, sub_foreign = _previous_run_entries(path)
            ours += sub_ours
            foreign += sub_foreign
        elif _is_ours(path):
            ours.append(path)
        elif name in RUN_FILES or name == "final" or _step_of(name) is not None:
            foreign.append(path)
    return ours, foreign


def prepare_output_dir(output_dir: str, *, resuming: bool, overwrite: bool, apply: bool = True,
                       stages: tuple[str, ...] = ()) -> None:
    """Check ``output_dir`` before any work: writable, and not holding another run's files
    unless resuming (they are this run's past) or ``overwrite`` (they are deleted, see the
    module docstring). ``apply=False`` only checks (ranks other than 0; the CLI before it
    builds a model). ``stages``: the subfolders a pipeline puts its runs in (``icrm train``'s).
    """
    ensure_writable_dir(output_dir)
    if resuming:
        return
    ours, foreign = _previous_run_entries(output_dir, stages)
    if foreign:
        raise IcrmError(f"output_dir {output_dir} holds {', '.join(foreign)}, which icrm did not write; "
                        "move it away or choose another output_dir")
    if not ours:
        return
    if not overwrite:
        shown = ", ".join(os.path.relpath(p, output_dir) for p in ours[:6]) + (" ..." if len(ours) > 6 else "")
        if any(_step_of(os.path.basename(p)) is not None for p in ours):
            raise IcrmError(f"output_dir {output_dir} holds a previous run ({shown}); pass "
                            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir true to replace "
                            "it, or choose another output_dir")
        raise IcrmError(f"output_dir {output_dir} holds a previous run that saved no checkpoint ({shown}), so there "
                        "is nothing to continue; pass --overwrite_output_dir true to start it again, or choose "
                        "another output_dir")
    if apply:
        for path in ours:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        log.warning("overwrite_output_dir: removed the previous run's %s", ", ".join(os.path.relpath(p, output_dir) for p in ours))


# ------------------------------------------------------------------------------------------
# Writing and reading a checkpoint's files (the trainer orders the ranks around these)

def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_paths(output_dir: str, step: int) -> tuple[str, str]:
    """``(tmp, final)``: where a checkpoint of ``step`` is written, and where it is promoted to."""
    return (os.path.join(output_dir, f"tmp-{CHECKPOINT_PREFIX}{step}"),
            os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}"))


def write_checkpoint_files(tmp: str, *, model_state: dict, tokenizer, config, optimizer_state: dict,
                           scheduler_state: dict, scaler_state: dict | None, trainer_state: dict, write_meta) -> None:
    """Everything but the RNG states (each rank writes its own) and the manifest, into ``tmp``.
    ``write_meta(tmp)``: the trainer's extra files (the reward model's ``icrm_reward_model.json``)."""
    from .model import save_tokenizer, without_aliases

    save_file(without_aliases(model_state), os.path.join(tmp, "model.safetensors"))
    save_tokenizer(tokenizer, tmp)
    config.save_pretrained(tmp)
    write_meta(tmp)
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
    if scaler_state is not None:
        torch.save(scaler_state, os.path.join(tmp, "scaler.pt"))
    with open(os.path.join(tmp, TRAINER_STATE), "w") as fh:
        json.dump(trainer_state, fh, indent=1)


def finish_checkpoint(tmp: str, final: str, keep: int) -> None:
    """Manifest last, flush, promote ``tmp`` to ``final``; keep the newest ``keep`` checkpoints."""
    write_manifest(tmp)  # last: a checkpoint with a valid manifest is complete
    fsync_tree(tmp)
    promote(tmp, final)
    output_dir = os.path.dirname(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    remove_leftovers(output_dir)


#: What a failed write says in its exception chain when the disk (or a quota) is full: the OS
#: error number, safetensors' Rust ``StorageFull``, or torch.save's zip writer (which keeps no errno).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left", "storagefull", "quota exceeded", "file write failed")


def _disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc).lower() for text in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def checkpoint_writing(tmp: str, final: str):
    """Around the writes of one checkpoint: on a failure ``tmp`` is removed (earlier checkpoints are
    never touched) and a full disk, or any other OS error, becomes one :class:`IcrmError` line
    naming the folder instead of the writers' chained tracebacks."""
    try:
        yield
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            reason = "no space left on device"
        elif isinstance(exc, OSError):
            reason = exc.strerror or first_line(exc)
        else:
            raise
        kept = list_checkpoints(os.path.dirname(final))
        raise IcrmError(f"{reason} while writing checkpoint to {final}; nothing of it was kept (newest intact "
                        f"checkpoint: {kept[-1] if kept else 'none'}); free space and rerun with "
                        "--resume_from_checkpoint latest") from None


def read_checkpoint(path: str, device: torch.device, rank: int) -> dict:
    """Every file of a checkpoint, read before anything is restored; a bad one is named
    (:class:`IcrmError`). Keys: ``state`` (trainer state), ``model``, ``optimizer``, ``scheduler``
    and, where present, ``scaler`` and ``rng`` (this rank's)."""

    def read(name, loader):
        full = os.path.join(path, name)
        try:
            return loader(full)
        except Exception as exc:  # noqa: BLE001  (any reader failure means a damaged file)
            raise IcrmError(f"{full} cannot be read ({first_line(exc)})") from None

    def load_json(full):
        with open(full) as fh:
            return json.load(fh)

    state = read(TRAINER_STATE, load_json)
    missing = {"global_step", "epoch", "batch_in_epoch", "num_tokens", "smooth_weight", "log_history"} - set(state)
    if missing:
        raise IcrmError(f"{os.path.join(path, TRAINER_STATE)} lacks {sorted(missing)}")
    model = read("model.safetensors", lambda f: load_file(f, device=str(device)))
    bad = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise IcrmError(f"{os.path.join(path, 'model.safetensors')} holds non-finite values in {bad[0]}")
    loaded = {"state": state, "model": model,
              "optimizer": read("optimizer.pt", lambda f: torch.load(f, map_location=device, weights_only=False)),
              "scheduler": read("scheduler.pt", lambda f: torch.load(f, weights_only=False))}
    for key, name in (("scaler", "scaler.pt"), ("rng", f"rng_state_{rank}.pt")):
        if os.path.exists(os.path.join(path, name)):
            loaded[key] = read(name, lambda f: torch.load(f, weights_only=False))
    return loaded


def newest_intact(resume: str, output_dir: str, read) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
    """``(path, read(path), damaged)`` for the best checkpoint of ``resume`` (see
    :func:`resume_candidates`) whose manifest and files check out; ``damaged``: ``[(path, why)]``
    of those passed over, each named in a warning. ``(None, None, damaged)`` when none is intact;
    the caller decides (nothing found with ``auto`` is a fresh start, damage alone an error)."""
    damaged = []
    for path in resume_candidates(resume, output_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                return path, read(path), damaged
            except IcrmError as exc:
                problem = str(exc)
        damaged.append((path, problem))
        log.warning("checkpoint %s is damaged: %s", path, problem)
    return None, None, damaged
