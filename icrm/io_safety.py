"""Files the user gives and files we write: clear errors, and outputs that never half-exist.

* :class:`IcrmError`: a fault the user can fix (bad path, damaged checkpoint, non-finite
  loss). ``icrm`` prints it as one line, ``icrm: error: <message>``, exit code 2.
* :func:`atomic_path`: write to a temporary name in the target's folder and rename it into
  place only when the block succeeds, so a crash or a bad input leaves the old file whole.
* :func:`refuse_same_file`: an input and an output that are the same file are refused before
  either is opened.
* :func:`ensure_writable_dir`: an output folder is proven writable before work starts.
* :func:`check_model_source`: a model path that is neither a folder/config file nor a
  plausible hub id is named in the error instead of surfacing as a hub ``OSError``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile


class IcrmError(ValueError):
    """A user-fixable fault; the message names the file or field and what was expected.

    A ``ValueError`` so that callers catching bad-argument errors keep working.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def refuse_same_file(input_path: str, output_path: str, what: str = "--output") -> None:
    """Raise when ``output_path`` is ``input_path`` (also through links), before anything is opened."""
    if output_path == "-":
        return
    if os.path.exists(input_path) and os.path.exists(output_path):
        same = os.path.samefile(input_path, output_path)
    else:
        same = os.path.realpath(input_path) == os.path.realpath(output_path)
    if same:
        raise IcrmError(f"{what} {output_path} is the input file; writing it would destroy the input. "
                        "Choose another output path")


@contextlib.contextmanager
def atomic_path(path: str, *, directory: bool = False):
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (a file, or a
    folder with ``directory=True``), on any error remove it and leave ``path`` as it was.

    A folder that already exists at ``path`` is replaced only after the new one is complete,
    and only if it is empty or a saved model (has ``config.json``): a folder of other files
    is refused, not swept away.
    """
    if directory and os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise IcrmError(f"{path} exists and is not a saved model folder (no config.json); refusing to replace it")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.normpath(path))
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
        os.close(fd)
    try:
        yield tmp
        fsync_tree(tmp)
        if directory and os.path.isdir(path):
            trash = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.replace(path, os.path.join(trash, base))
            os.replace(tmp, path)
            shutil.rmtree(trash)
        else:
            if not directory and os.path.exists(path):
                shutil.copymode(path, tmp)
            else:
                os.chmod(tmp, 0o777 & ~_umask() if directory else 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(path: str) -> None:
    """Flush a file, or every file of a folder, to disk before it is renamed into place."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for name in files:
        with open(name, "rb") as fh:
            os.fsync(fh.fileno())


def ensure_writable_dir(path: str, field: str = "output_dir") -> None:
    """Create ``path`` if needed and prove a file can be written there; else raise naming it."""
    probe_from = path
    while probe_from and not os.path.exists(probe_from):
        probe_from = os.path.dirname(probe_from)
    if probe_from and not os.path.isdir(probe_from):
        where = "" if probe_from == path else f": {probe_from}"
        raise IcrmError(f"{field} {path}{where} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise IcrmError(f"{field} {path} is not writable ({exc.strerror or exc})") from None


#: ``name`` or ``org/name`` with the characters the Hugging Face hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_source(path: str, field: str = "model_name_or_path") -> None:
    """Raise unless ``path`` is an existing folder / ``.json`` config, or could be a hub id."""
    if os.path.isdir(path) or (path.endswith(".json") and os.path.isfile(path)):
        return
    if path.endswith(".json"):
        raise IcrmError(f"{field} {path}: no such config file")
    if os.path.exists(path):
        raise IcrmError(f"{field} {path} is a file; expected a model folder, a config .json or a hub id")
    if not _HUB_ID.match(path) or ".." in path:
        raise IcrmError(f"{field} {path}: no such folder, and not a Hugging Face hub id (org/name)")
