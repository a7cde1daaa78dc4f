"""A checkpoint folder's files as files: the format's names and version, the manifest with the
SHA-256 of each file, their verification, finishing a save interrupted between its renames (under
the folder's lock, which a save holds too), naming a first save cut off before them, and the mode
of the files safetensors writes. Apart from ``_checkpoint.py``, which writes and reads what the
files hold (see its docstring for the layout), because this part trusts nothing in them and only
checks and names."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgpack

from ._checkpoint_tree import ARRAYS
from ._runtime._config import RunConfig
from .backends._dtypes import unknown_dtype_hint

FORMAT = "asyncnn-checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
SPEC = "spec.msgpack"
_MAX_MANIFEST_BYTES = 1 << 16
_MAX_SPEC_BYTES = 1 << 30
_T = TypeVar("_T")


class CheckpointError(ValueError):
    """A checkpoint folder is damaged, incomplete, of another format version, or does not fit
    its graph; the message names the file and what is wrong."""


def write_whole(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` whole or not at all: through ``path.tmp`` and a rename, the
    ``.tmp`` removed when the write fails (a full disk, an interrupt).

    Raises:
        OSError: the disk refused the file; ``path`` is left as it was. One that names no file
            (a write that fails on a full disk names none) is raised naming ``path``.
    """
    tmp = path + ".tmp"
    try:
        with naming(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        with naming(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


#: where Linux (4.7 and later) tells a process its umask without it being changed
_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask: read from :data:`_STATUS` where the system has it, else set and set
    back under a lock (a file another thread makes in between gets 0o077, never more access)."""
    try:
        with open(_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def give_open_mode(file: str) -> None:
    """Gives ``file`` the mode a file made by ``open()`` gets (0o666 less the umask), as every
    other file of a checkpoint has: safetensors writes through a temporary file it makes 0600
    (safetensors#782), which no other user could read where the spec beside it is readable."""
    # (a file system without modes, or one refusing chmod, keeps its own: the file is written)
    with contextlib.suppress(OSError):
        os.chmod(file, 0o666 & ~_umask())


@contextlib.contextmanager
def folder_lock(path: str, shared: bool = False) -> Iterator[bool]:
    """Holds an advisory lock (``flock``) on the folder ``path`` in its block, exclusive or
    ``shared``; yields whether it holds it. A save holds it exclusive from its first write to
    its last rename, a load holds it shared from its check to its read (:func:`read_verified`:
    no save's renames land in between) and exclusive to finish a save interrupted between its
    renames: so a load never renames the files of a save under way (nor those of the next
    save, made after it found them), nor reads the spec of one checkpoint with the arrays of
    another. Not reentrant: a block must not take it again. Where the system has no ``flock``
    (Windows) or the file system refuses it (some network ones), the block runs unlocked (it
    gets False); the renames then take one done by the other side as done
    (:func:`replace_unless_done`), and a load checks the checksums again after its read."""
    fd = -1
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # (Windows; a folder that cannot be opened)
        pass
    if fd < 0:  # (the block runs outside the except, which it would otherwise be chained to)
        yield False
        return
    try:
        locked = False
        with contextlib.suppress(OSError):  # (ENOLCK, or EBADF on NFS: unlocked)
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            locked = True
        yield locked
    finally:
        os.close(fd)  # (which releases the lock)


def replace_unless_done(src: str, dst: str, done: Callable[[], bool]) -> None:
    """``os.replace(src, dst)``, where a ``src`` gone because another process renamed it into
    place (a load that finished this save, or the save that a load is finishing) is fine when
    ``done()`` says ``dst`` holds what ``src`` held.

    Raises:
        FileNotFoundError: ``src`` is gone and ``dst`` does not hold its content.
        OSError: the rename failed otherwise.
    """
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if not done():
            raise


def _holds(file: str, entry: Any) -> bool:
    """Whether ``file`` is the one a manifest's ``entry`` (``{"bytes", "sha256"}``) lists;
    False where it is missing or unreadable."""
    try:
        return bool(os.path.getsize(file) == entry["bytes"] and _sha256(file) == entry["sha256"])
    except (OSError, TypeError, KeyError):
        return False


def _holds_manifest(file: str, manifest: dict[str, Any]) -> bool:
    """Whether the manifest ``file`` reads as ``manifest``; False where missing or damaged."""
    try:
        return _read_manifest(file) == manifest
    except (OSError, ValueError):
        return False


def write_failed(number: int | None, why: str, file: str, hint: str = "") -> OSError:
    """The error of a write of ``file`` that failed with errno ``number`` (``why``: its words,
    such as "No space left on device"): an ``OSError`` of that errno (``OSError`` picks the
    subclass), saying ``writing FILE failed (why)`` and then ``hint``."""
    message = f"writing {file} failed ({why}){hint}"
    return OSError(message) if number is None else OSError(number, message)


@contextlib.contextmanager
def naming(file: str, hint: str = "") -> Iterator[None]:
    """Has an ``OSError`` that names no file, raised inside, name ``file`` (with ``hint`` after
    it): a write that fails on a full disk says only "[Errno 28] No space left on device", of
    no file (its ``open`` would have named it). The original is the new error's cause."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise write_failed(exc.errno, exc.strerror or str(exc), file, hint) from exc


@contextlib.contextmanager
def naming_safetensors(file: str, hint: str = "") -> Iterator[None]:
    """Raises safetensors' error of a write the disk refused as an ``OSError`` of its errno,
    naming ``file`` (with ``hint`` after it): its ``SafetensorError`` is no ``OSError``, and
    says "Error while serializing: I/O error: No space left on device (os error 28)" of no
    file. The original is the cause. Its other errors are no disk's: they go on as they are."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        # "... I/O error: No such file or directory (os error 2) at path \"/x/.tmpAbC\"": the
        # system's words and number; the path is safetensors' own temporary file, not named
        found = re.search(
            r"I/O error: (.*?)(?: \(os error (\d+)\))?(?: at path .*)?$", str(exc).strip()
        )
        if found is None:
            raise
        number = int(found.group(2)) if found.group(2) else errno.EIO
        raise write_failed(number, found.group(1), file, hint) from exc


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(file: str) -> dict[str, Any]:
    """A manifest file's JSON object (format and version unchecked).

    Raises:
        ValueError: it is too large, not JSON (UnicodeDecodeError too) or not an object.
        OSError: it cannot be read.
    """
    if os.path.getsize(file) > _MAX_MANIFEST_BYTES:
        raise ValueError(f"it is larger than {_MAX_MANIFEST_BYTES} bytes")
    with open(file, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError("it is not a JSON object")
    return manifest


def _finish_save(path: str) -> bool:
    """Finishes a save interrupted between its renames, whose new files are all there (each
    renamed or still ``*.tmp``, checked against the new ``manifest.json.tmp``): renames the rest,
    under the folder's lock (:func:`folder_lock`: a save under way is waited for); returns
    whether it did. Not to be called holding that lock (a save calls
    :func:`_finish_save_locked`).

    Raises:
        CheckpointError: the folder is read-only (or its files may not be renamed): naming it,
            saying that a save was interrupted and how to load it.
    """
    with folder_lock(path):
        return _finish_save_locked(path)


def _finish_save_locked(path: str) -> bool:
    """:func:`_finish_save`, its caller holding the folder's lock."""
    found = _finishing_sources(path)
    if found is None:
        return False
    manifest, sources = found
    tmp_manifest = os.path.join(path, MANIFEST + ".tmp")
    try:
        for name, file in sources.items():
            final = os.path.join(path, name)
            if file != final:  # (renamed meanwhile by its saver, where the folder has no lock)
                entry = manifest["files"][name]
                replace_unless_done(file, final, functools.partial(_holds, final, entry))
        final = os.path.join(path, MANIFEST)
        done = functools.partial(_holds_manifest, final, manifest)
        replace_unless_done(tmp_manifest, final, done)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise CheckpointError(
            f"{path}: a save into this folder was interrupted between its renames (its new "
            f"checkpoint is whole, in the files {MANIFEST}.tmp lists), and it cannot be finished "
            f"here ({exc.strerror}: {exc.filename}): copy the folder to a writable place and "
            "load it there (the load finishes the save), or make the folder writable"
        ) from exc
    return True


def _finishable(path: str) -> bool:
    """Whether ``path`` holds a save interrupted between its renames that :func:`_finish_save`
    would finish (a checkpoint, once loaded); changes nothing."""
    return _finishing_sources(path) is not None


def _finishing_sources(path: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The new manifest (``manifest.json.tmp``'s) and ``{name: the file holding its new
    content}`` of a save interrupted between its renames whose new files are all there (see
    :func:`_finish_save`); ``None`` for any other folder."""
    tmp_manifest = os.path.join(path, MANIFEST + ".tmp")
    try:
        manifest = _read_manifest(tmp_manifest)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != {SPEC, ARRAYS}:
            return None
        sources: dict[str, str] = {}
        for name, entry in files.items():
            # (the .tmp first: one renamed while it is read is then found at its place)
            for file in (os.path.join(path, name + ".tmp"), os.path.join(path, name)):
                if _holds(file, entry):
                    sources[name] = file
                    break
            else:
                return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return manifest, sources


def read_verified(path: str, read: Callable[[], _T]) -> tuple[dict[str, Any], _T]:
    """The manifest of the checkpoint folder ``path``, verified (:func:`verify_checkpoint`), and
    what ``read()`` reads of its files, of the same checkpoint: under the folder's shared lock
    (:func:`folder_lock`), so that no save's renames land between the check and the read (the
    old spec with the new arrays). A save interrupted between its renames is finished first
    (:func:`_finish_save`); a folder that fails while a save there is under way is checked again
    once that save ends (the load waits for it). Where the folder cannot be locked, the
    checksums are checked again after the read, and a checkpoint replaced meanwhile is read
    once more.

    Raises:
        CheckpointError: as :func:`verify_checkpoint` and :func:`_finish_save` raise it; or,
            unlocked, the checkpoint was replaced during both reads (saying so).
        Exception: what ``read`` raises.
    """
    manifest_path = os.path.join(path, MANIFEST)
    for _ in range(2):
        before = _stamp(manifest_path)
        with folder_lock(path, shared=True) as locked:
            checked = _verified(path)
            if not isinstance(checked, CheckpointError):
                got = read()
                if locked or _verified(path) == checked:
                    return checked, got
                continue  # (replaced meanwhile, unlocked: read again)
        with folder_lock(path) as locked:
            # (a save that renamed its manifest meanwhile has replaced what failed)
            if not _finish_save_locked(path) and _stamp(manifest_path) == before:
                raise checked
            manifest = verify_checkpoint(path)
            got = read()
            if locked or _verified(path) == manifest:
                return manifest, got
    raise CheckpointError(
        f"{path}: the checkpoint was replaced while it was read, twice (saves into this folder "
        "under way, which the system cannot lock): load it again once they end"
    )


def _verified(path: str) -> dict[str, Any] | CheckpointError:
    """:func:`verify_checkpoint`'s manifest, or the error it raised."""
    try:
        return verify_checkpoint(path)
    except CheckpointError as exc:
        return exc


def _stamp(file: str) -> tuple[int, int, int] | None:
    """What changes when ``file`` is replaced (its inode, time and size); None: missing."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _interrupted_first_save(path: str) -> str | None:
    """What to say of a folder that holds no checkpoint but the files a save writes before
    renaming them into place (``*.tmp``): its first save was cut off (the process killed, the
    machine down) before it finished; ``None`` for any other folder."""
    if not os.path.isdir(path) or any(
        os.path.exists(os.path.join(path, name)) for name in (SPEC, MANIFEST)
    ):
        return None
    left = [
        n + ".tmp"
        for n in (MANIFEST, SPEC, ARRAYS)
        if os.path.exists(os.path.join(path, n + ".tmp"))
    ]
    if not left:
        return None
    return (
        f"{path}: no checkpoint was saved here: a save into this folder was interrupted before "
        f"it finished (it left {', '.join(left)}, and no {MANIFEST} or {SPEC}); load an "
        "earlier checkpoint, or save the trainer here again (the save replaces those files)"
    )


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Checks a checkpoint folder's manifest (format, version) and the checksum of every file it
    lists; returns the manifest.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        interrupted = _interrupted_first_save(path)
        if interrupted is not None:
            raise CheckpointError(interrupted)
        raise CheckpointError(
            f"{path}: the checkpoint has no {MANIFEST} (it was written by an asyncnn older than "
            f"checkpoint format version {VERSION}, which kept no checksums, or the file was "
            "deleted); load it with the asyncnn that wrote it"
        )
    try:
        manifest = _read_manifest(manifest_path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path} is not an asyncnn checkpoint manifest (format "
            f"{manifest.get('format')!r:.80}, expected {FORMAT!r})"
        )
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format version {manifest.get('version')!r:.80}; this "
            f"asyncnn reads version {VERSION} (load it with the asyncnn that wrote it)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {SPEC, ARRAYS}:
        raise CheckpointError(
            f"{manifest_path} is damaged: it must list exactly {SPEC} and {ARRAYS}, not "
            f"{sorted(files) if isinstance(files, dict) else files!r:.80}"
        )
    for name, entry in files.items():
        file = os.path.join(path, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(
                f"{manifest_path} is damaged: its entry for {name} is {entry!r:.80}"
            )
        if not os.path.exists(file):
            raise CheckpointError(f"{file} is missing (the manifest lists it)")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file} is damaged: it has {size} bytes, {manifest_path} says {entry['bytes']}"
            )
        if _sha256(file) != entry.get("sha256"):
            raise CheckpointError(
                f"{file} is damaged: its SHA-256 differs from the one in {manifest_path} (one of "
                "the two changed after the checkpoint was saved)"
            )
    return manifest


def _read_spec(spec_path: str) -> dict[str, Any]:
    """The spec file's map, its fields checked (the trees in its layout are checked as they are
    read back).

    Raises:
        CheckpointError: it is damaged, of another format or version, or malformed: naming the
            file, the field and what it must be; or its weights are bfloat16 and this machine
            lacks ml_dtypes (said so, with how to install it).
    """
    try:
        with open(spec_path, "rb") as f:
            spec = msgpack.unpackb(f.read(_MAX_SPEC_BYTES + 1), raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is damage
        raise CheckpointError(f"{spec_path} is damaged: {type(exc).__name__}: {exc}") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise CheckpointError(f"{spec_path} is not an asyncnn checkpoint (format {got!r:.80})")
    if spec.get("version") != VERSION:
        raise CheckpointError(
            f"{spec_path}: checkpoint format version {spec.get('version')!r:.80}; this asyncnn "
            f"reads version {VERSION}"
        )
    for key, kind in (("graph", dict), ("optimizer", dict), ("policy", dict), ("layout", dict),
                      ("seed", int), ("dtype", str)):  # fmt: skip
        if not isinstance(spec.get(key), kind):
            raise CheckpointError(
                f"{spec_path} is malformed: {key!r} must be a {kind.__name__}, got "
                f"{spec.get(key)!r:.80}"
            )
    if unknown_dtype_hint(spec["dtype"]):  # (an intact file this machine cannot read)
        raise CheckpointError(
            f"{spec_path}: this checkpoint's weights are {spec['dtype']}, which needs the "
            "ml_dtypes package (pip install ml_dtypes), also to load it with another dtype=: "
            "numpy reads bfloat16 only through it"
        )
    why = _malformed(spec)
    if why is not None:
        raise CheckpointError(f"{spec_path} is malformed: {why}")
    return spec


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: the fields of each layer's entry in a spec's layout (besides "pending", "actor_state" and
#: "earlier", which a checkpoint holds only where there are any)
_ENTRY = ("params", "opt_state", "version")


def _malformed(spec: dict[str, Any]) -> str | None:
    """What is wrong with ``spec``'s fields besides those :func:`_read_spec` checks first (the
    field and what it must be), or None. Checked all here, so that a damaged field is named as
    such rather than met half-way through rebuilding the trainer as a KeyError's bare text."""
    for key in ("minibatches", "keys", "epochs_done"):
        if not _is_count(spec.get(key)):
            got = f"got {spec[key]!r:.80}" if key in spec else "but the spec has none"
            return f"{key!r} must be a count (an int >= 0), {got}"
    seed = spec["seed"]
    if isinstance(seed, bool) or not 0 <= seed < 2**64:
        return f"'seed' must be an int from 0 to 2**64 - 1, got {seed!r:.80}"
    dtype = spec["dtype"]
    try:
        RunConfig(dtype=dtype)
    except ValueError:  # (bfloat16 without ml_dtypes: _read_spec said so before)
        return (
            "'dtype' must name a floating dtype (the trainer's), such as 'float32' or "
            f"'float64', got {dtype!r:.80}"
        )
    traces = spec.get("traces", [])  # (none in a checkpoint of an older asyncnn)
    if not isinstance(traces, list) or not all(isinstance(t, str) for t in traces):
        return f"'traces' must be a list of the trace paths (str) written, got {traces!r:.80}"
    for name, entry in spec["layout"].items():
        where = f"'layout' of {name!r}"
        must = f"{where} must be a map with 'params', 'opt_state' and 'version'"
        if not isinstance(entry, dict):
            return f"{must}, got {entry!r:.80}"
        lacks = [key for key in _ENTRY if key not in entry]
        if lacks:
            return f"{must}; it lacks {', '.join(map(repr, lacks))}"
        if not _is_count(entry["version"]):
            return (
                f"{where}: its 'version' must be a count (an int >= 0), got "
                f"{entry['version']!r:.80}"
            )
        pending = entry.get("pending")  # (gradients accumulated and not yet applied)
        if "pending" in entry and not (
            isinstance(pending, dict) and "grads" in pending and _is_count(pending.get("count"))
        ):
            return (
                f"{where}: its 'pending' must be a map with 'grads' and 'count' (an int >= 0), "
                f"got {pending!r:.80}"
            )
        if isinstance(pending, dict) and "delays" in pending:  # (a later optional field)
            delays = pending["delays"]
            if not (isinstance(delays, list) and all(_is_count(d) for d in delays)):
                return (
                    f"{where}: its 'pending' 'delays' must be a list of the pending gradients' "
                    f"delays (ints >= 0), got {delays!r:.80}"
                )
            if len(delays) > pending["count"]:
                return (
                    f"{where}: its 'pending' holds {len(delays)} 'delays', more than the "
                    f"{pending['count']} gradients its 'count' says it sums"
                )
        if "earlier" in entry:
            why = _malformed_earlier(entry["earlier"], entry["version"])
            if why is not None:
                return f"{where}: its 'earlier' {why}"
    return None


def _malformed_earlier(earlier: Any, version: int) -> str | None:
    """What is wrong with a layer entry's ``"earlier"`` (the versions before its ``version``
    that forwards are pinned to, ``[{"version": v, "params": tree}, ...]``), or None."""
    if not isinstance(earlier, list) or not all(
        isinstance(e, dict) and "version" in e and "params" in e for e in earlier
    ):
        return f"must be a list of maps with 'version' and 'params', got {earlier!r:.80}"
    seen = set()
    for e in earlier:
        v = e["version"]
        if not _is_count(v):
            return f"holds version {v!r:.40}, which is not a count (an int >= 0)"
        if v >= version:
            return f"holds version {v}, which is not below the layer's {version}"
        if v in seen:
            return f"holds version {v} twice"
        seen.add(v)
    return None
