"""Output files: every file one run writes, checked before any work and put in place together at the end.

An :class:`OutputSet` holds the run's destinations (``--csv``, ``--json``, ``--save-masks``, ...). Adding one
checks it at once, before any checkpoint is read:

* it is not an input of the run: not the same file (device and inode, so symlinks and hard links count) as a
  checkpoint file, an index, a shard or a rules file; with a Hub id among the inputs, not inside the Hub cache;
* it is not another destination of the run;
* if it exists, it is a regular file, and no link on the way leads into /dev (but /dev/shm) or /proc. A
  directory, a device (``/dev/null``), a FIFO or a descriptor link (``/dev/stdout``, ``/dev/fd/3``, which
  may stand for the shell's ``> file``) is refused rather than replaced by a rename: output files are written
  atomically, which a stream cannot be, and ``--format`` already prints to stdout;
* its folder takes a new file (one is created and removed), so a read-only file system or a folder without
  write permission fails now rather than after the work.

A destination that is a symlink is written through: the bytes replace the link's final target and the link
stays. Each output's bytes go to a temporary file beside that target (same file system, so the rename is
atomic), created with mode ``0666 & ~umask`` like any other tool's output, and named so a person recognises it
(``.x.csv.ckptdiff-<host hash>-<pid>-<random>.tmp``); one left by a run killed outright (SIGKILL, out of memory) is
removed by the next run to the same destination once its process is gone. :meth:`OutputSet.commit` renames
every temporary into place, back to back, once all of them are complete; any failure before that, Ctrl-C,
SIGTERM or SIGHUP removes them all (see :func:`signals_as_interrupts`), so a run leaves all its files or none.
Write errors (read-only file system, full disk, quota, permissions) become one-line :class:`InputError` s that
name the path.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io import layout
from ckptdiff.runtime.signals import note_commit, signals_held

PathLike = str | Path
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or pick another folder",
    errno.EDQUOT: "the disk quota is exhausted: free some space or pick another folder",
    errno.EROFS: "the file system is read-only: pick another folder",
    errno.EACCES: "permission denied: check the folder's permissions or pick another folder",
    errno.EPERM: "permission denied: check the folder's permissions or pick another folder",
}


def write_error(flag: str, path: Path, error: OSError) -> InputError:
    """``cannot write --csv x.csv: permission denied: check ...``: the advice says the cause once, in its own words;
    a cause without advice is the system's words, then ``pick another path``."""
    advice = _ADVICE.get(error.errno or 0)
    cause = advice or f"{error.strerror or error}; pick another path"
    return InputError(f"cannot write {flag} {path}: {cause}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO")):
        if test(mode):
            return name
    return "socket" if stat.S_ISSOCK(mode) else "special file"


# A temporary file's name says whose it is: `.x.csv.ckptdiff-<host>-<pid>-<random>.tmp`, <host> a short hash of
# the host name (a shared file system can hold other hosts' runs; the name itself is not written).
T = TypeVar("T")
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")
# A temporary folder (report -o, patch apply to a folder) is named alike; `.old` holds a report being replaced.
_TEMP = re.compile(r"^\.(?P<name>.+)\.ckptdiff-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}\.(?P<kind>tmp|old)$")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts: it may be that run)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporaries an earlier run to ``target`` left behind when it was killed (SIGKILL, the OOM
    killer), those it can prove were ckptdiff's: named for ``target`` by ckptdiff on this host, by a process that
    no longer exists, of this user, and not a link: a regular file, or a folder (a report or a patched checkpoint
    being written, removed whole). A ``.old`` folder (a report being replaced) is removed only while ``target``
    exists: otherwise the run was killed between its two renames and the folder holds the only copy of the earlier
    report. Anything else stays. Returns what was removed."""
    import shutil

    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != target.name or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.getuid():
                continue
            if stat.S_ISREG(st.st_mode) and m["kind"] == "tmp":
                os.unlink(entry.path)
            elif stat.S_ISDIR(st.st_mode) and (m["kind"] == "tmp" or os.path.lexists(target)):
                shutil.rmtree(entry.path)
            else:
                continue
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _make_temp(target: Path, kind: str, make: Callable[[Path], T]) -> tuple[T, Path]:
    """``make(path)`` at a new temporary name beside ``target`` (the _TEMP pattern, this host and process), after
    removing the stale temporaries of earlier killed runs to ``target`` (:func:`remove_stale`); ``make`` raises
    FileExistsError when the name is taken, and another is tried."""
    remove_stale(target)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.ckptdiff-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"
        try:
            return make(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def temp_folder(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside ``target`` (mode 0700), named as ckptdiff's temporaries are, so that the next run
    to ``target`` can remove it if this one is killed (:func:`remove_stale`)."""
    return _make_temp(target, kind, lambda p: os.mkdir(p, 0o700))[1]


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new empty file beside ``target``, mode 0666 & ~umask (the kernel applies the umask), open for writing;
    stale temporaries of earlier killed runs to ``target`` go first (:func:`remove_stale`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return _make_temp(target, "tmp", lambda p: os.open(p, flags, 0o666))


def _final_target(flag: str, given: Path) -> Path:
    """The file ``given`` ends at, every symlink followed; refuse a path that is or leads to /dev or /proc.

    /dev/stdout, /dev/fd/N and /proc/self/fd/N are links to whatever the descriptor is open on; when that is a
    regular file (``> out.txt``), following them naively would replace the shell's redirect target behind its
    back. Checked hop by hop, since realpath alone sees only the end of the chain. /dev/shm is an ordinary
    tmpfs folder and allowed.
    """
    hop = Path(os.path.abspath(given))
    for _ in range(40):
        where = Path(os.path.realpath(hop.parent)) / hop.name
        for path in (hop, where):
            special = path.is_relative_to("/dev") and not path.is_relative_to("/dev/shm")  # shm: a plain tmpfs
            if special or path.is_relative_to("/proc"):
                raise InputError(
                    f"cannot write {flag} {given}: it leads to {path}, a device or process file, and output files "
                    "are replaced atomically; give a regular file path (to print to stdout, use --format)"
                )
        if not where.is_symlink():
            return where
        hop = Path(os.path.normpath(where.parent / os.readlink(where)))
    raise InputError(f"cannot write {flag} {given}: too many levels of symbolic links; pick another path")


def _remove(path: Path | None) -> None:
    if path is not None:
        with suppress(FileNotFoundError):
            os.unlink(path)


class Output:
    """One destination: the path as given, the file its bytes land in, and its temporary file while written."""

    def __init__(self, owner: OutputSet, flag: str, path: Path, target: Path):
        self.owner = owner
        self.flag = flag  # the option it came from, for messages
        self.path = path  # as given (a symlink stays one)
        self.target = target  # ``path`` with every symlink followed: the file that is replaced
        self.tmp: Path | None = None
        self.file: IO[bytes] | None = None
        self.finished = False

    def __str__(self) -> str:
        return str(self.path)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Turn an OSError raised while writing this output into a one-line InputError that names it."""
        try:
            yield
        except OSError as e:
            raise write_error(self.flag, self.path, e) from None

    def open(self) -> IO[bytes]:
        """A fresh temporary file beside the target, open for binary writing; :meth:`finish` completes it."""
        if self.tmp is not None:
            raise RuntimeError(f"{self.flag} {self.path} is already being written")
        with signals_held(), self.writing():  # a signal between creating the file and noting it would leave it
            fd, self.tmp = _create_temp(self.target)
            self.file = os.fdopen(fd, "wb")
        return self.file

    def write(self, data: bytes | str) -> None:
        """The whole content at once (text as UTF-8), then :meth:`finish`."""
        f = self.open()
        with self.writing():
            f.write(data.encode() if isinstance(data, str) else data)
        self.finish()

    def finish(self) -> None:
        """The content is complete: flush it to disk. A standalone output is renamed into place now."""
        if self.file is None:
            raise RuntimeError(f"{self.flag} {self.path} was never opened")
        with self.writing():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        self.file = None
        self.finished = True
        if self.owner.autocommit:
            self.owner.commit()

    def discard(self) -> None:
        """Close and delete the temporary file, if any."""
        if self.file is not None:
            with suppress(OSError):  # a failed flush of bytes that are about to be deleted anyway
                self.file.close()
            self.file = None
        _remove(self.tmp)
        self.tmp = None
        self.finished = False


class OutputSet:
    """The destinations of one run, checked when added; written to temporaries; renamed together by :meth:`commit`.

    Use it as a context manager: leaving the block by any exception (including :class:`Interrupted`) removes
    every temporary file. ``autocommit`` renames each output as soon as it is finished (one-file library calls).
    """

    def __init__(self, inputs: Iterable[object] = (), *, autocommit: bool = False):
        self.autocommit = autocommit
        self.outputs: dict[str, Output] = {}
        self._inputs: list[tuple[str, os.stat_result]] = []
        self._trees: list[Path] = []
        for spec in inputs:
            if isinstance(spec, (str, Path)):
                self._protect(str(spec))

    def _protect(self, spec: str) -> None:
        """Remember the files (or, for a Hub id, the cache folder) that input ``spec`` reads."""
        for p in input_files(spec):
            try:
                self._inputs.append((str(p), os.stat(p)))
            except OSError:
                continue
        if not os.path.exists(Path(spec).expanduser()) and layout.is_hub_id(spec):
            self._trees.append(Path(os.path.realpath(_hub_cache())))

    def add(self, flag: str, path: PathLike | None) -> Output | None:
        """Check destination ``path`` of option ``flag`` (see the module doc) and add it; None passes through."""
        if path is None:
            return None
        given = Path(path).expanduser()
        fileio.refuse_too_long(given, f"cannot write {flag} {given}")
        target = _final_target(flag, given)
        folder = target.parent
        if not folder.is_dir():
            raise InputError(
                f"cannot write {flag} {given}: folder {folder} does not exist; create it or pick another path"
            )
        try:
            st: os.stat_result | None = os.stat(target)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise InputError(f"cannot write {flag} {given}: it is a directory; give a file name")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"cannot write {flag} {given}: it is a {_kind(st.st_mode)}, not a regular file, and output files are "
                "replaced atomically; give a file path (to print to stdout, use --format)"
            )
        self._check_not_input(flag, given, target, st)
        for other in self.outputs.values():
            same = other.target == target
            if not same and st is not None and os.path.exists(other.target):
                same = os.path.samestat(st, os.stat(other.target))
            if same:
                raise InputError(
                    f"{other.flag} {other.path} and {flag} {given} are the same file; give each output its own path"
                )
        out = Output(self, flag, given, target)
        with signals_held(), out.writing():  # can a file be created there at all? Find out before the work
            fd, tmp = _create_temp(target)
            os.close(fd)
            os.unlink(tmp)
        self.outputs[flag] = out
        return out

    def _check_not_input(self, flag: str, given: Path, target: Path, st: os.stat_result | None) -> None:
        if st is not None:
            for name, input_st in self._inputs:
                if os.path.samestat(st, input_st):
                    raise InputError(
                        f"cannot write {flag} {given}: it is an input of this run ({name}) and would be destroyed; "
                        "pick another path"
                    )
        for tree in self._trees:
            if target.is_relative_to(tree):
                raise InputError(
                    f"cannot write {flag} {given}: it is inside the Hugging Face cache {tree}, which holds an input "
                    "of this run; pick another path"
                )

    def get(self, flag: str) -> Output | None:
        """The output added for ``flag``, or None."""
        return self.outputs.get(flag)

    def commit(self) -> None:
        """Rename every finished temporary onto its target, back to back, with SIGINT/SIGTERM/SIGHUP held off."""
        if not writes_files():  # under torchrun ranks only rank 0 writes; the others hold identical results
            self.discard()
            return
        pending = [o for o in self.outputs.values() if o.tmp is not None or not o.finished]
        for out in pending:
            if not out.finished:
                raise RuntimeError(f"{out.flag} {out.path} was never written")
        done: list[Output] = []
        with signals_held():
            try:
                for out in pending:
                    assert out.tmp is not None  # finished outputs hold their temporary until renamed
                    with out.writing():
                        os.replace(out.tmp, out.target)
                    out.tmp = None
                    done.append(out)
            finally:
                if done:
                    note_commit()
                if len(done) < len(pending):
                    self.discard()

    def discard(self) -> None:
        """Remove every temporary file (what is already in place stays); a second signal waits until all are gone."""
        with signals_held():
            for out in self.outputs.values():
                out.discard()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()


def writes_files() -> bool:
    """Whether this process writes output files: False on every rank but 0 under torchrun (no torch import)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    from ckptdiff.runtime.distributed import is_leader

    return is_leader()


def standalone(output: PathLike | Output | None, flag: str, inputs: Iterable[object] = ()) -> Output | None:
    """An output for a library call: one handed in by a caller's set passes through; a path becomes a one-file
    set, checked now against ``inputs`` (paths; open sources are skipped) and renamed into place when finished."""
    if output is None or isinstance(output, Output):
        return output
    return OutputSet(inputs, autocommit=True).add(flag, output)


def input_files(spec: str) -> list[Path]:
    """Files an input argument reads or may read, which no output may replace.

    A folder: every file in it (weights, index, ``config.json``, tokenizer and adapter files, anything else the
    user keeps there) and the shards its indexes name. A file: itself, the shards it names if it is an index,
    and the side files beside it that a run reads or a checkpoint is published with
    (:data:`ckptdiff.io.layout.SIDE_FILES`). A Hub id or a missing path gives none.
    """
    path = Path(spec).expanduser()
    try:
        st = path.stat()
    except (OSError, ValueError):  # missing, or unusable (too long, a loop): reading the input will say so
        return []
    if stat.S_ISDIR(st.st_mode):
        files = [p for p in path.iterdir() if not p.is_dir()]
    else:
        files = [path, *(p for pattern in layout.SIDE_FILES for p in path.parent.glob(pattern))]
    for index in [f for f in files if layout.is_index(f.name)]:
        try:
            files += layout.read_index(index)[0]
        except InputError:
            continue  # reading the checkpoint will report it; its other files are protected meanwhile
    return files


def _hub_cache() -> str:
    from ckptdiff.io.hub import download as hub

    configured = hub.cache_dir()
    if configured is not None:
        return configured
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


class OutputFolder:
    """A destination folder of several files (a rebuilt checkpoint's shards and index), written whole or not at all.

    Checked when made, before any work: the folder is new or empty (an existing file is never replaced, so no
    input can be lost), not a symbolic link, and its parent takes a new folder. The files are written into a hidden
    temporary folder beside it; :meth:`commit` renames that folder into place in one step (onto an empty folder of
    the same name, if any), and any failure or signal before then removes it.
    """

    def __init__(self, flag: str, path: PathLike, inputs: Iterable[object] = ()) -> None:
        self.flag = flag
        self.path = Path(path).expanduser()
        fileio.refuse_too_long(self.path, f"cannot write {flag} {self.path}")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"cannot write {flag} {self.path}: folder {parent} does not exist; create it first")
        if self.path.is_symlink():
            raise InputError(
                f"cannot write {flag} {self.path}: it is a symbolic link; give a new folder name (nothing is replaced)"
            )
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"cannot write {flag} {self.path}: it is a file; give a new folder name")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise InputError(
                f"cannot write {flag} {self.path}: the folder is not empty, and ckptdiff replaces no file; give a new "
                "or empty folder"
            )
        probe = OutputSet(inputs)
        for tree in probe._trees:
            if Path(os.path.realpath(parent)).is_relative_to(tree):
                raise InputError(
                    f"cannot write {flag} {self.path}: it is inside the Hugging Face cache {tree}, which holds an "
                    "input of this run; pick another path"
                )
        self.parent = parent
        self.tmp: Path | None = None
        self.files: dict[str, IO[bytes]] = {}
        with signals_held():
            try:
                fd, name = _create_temp(parent / self.path.name)
                os.close(fd)
                os.unlink(name)
            except OSError as e:
                raise write_error(flag, self.path, e) from None

    def open(self, name: str) -> IO[bytes]:
        """A new file ``name`` inside the folder being written, open for binary writing."""
        with signals_held():
            try:
                if self.tmp is None:
                    self.tmp = temp_folder(self.parent / self.path.name)
                f = open(self.tmp / name, "xb")  # noqa: SIM115 - closed by commit or discard
            except OSError as e:
                raise write_error(self.flag, self.path, e) from None
        self.files[name] = f
        return f

    def commit(self) -> None:
        """Flush every file to disk, then rename the folder into place (rank 0 only under torchrun)."""
        if not writes_files() or self.tmp is None:
            self.discard()
            return
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o777 & ~mask)
            with signals_held():
                os.rename(self.tmp, self.path)  # onto an empty folder too
                self.tmp = None
                note_commit()
        except OSError as e:
            self.discard()
            raise write_error(self.flag, self.path, e) from None

    def discard(self) -> None:
        """Close and remove everything written so far."""
        import shutil

        with signals_held():
            for f in self.files.values():
                with suppress(OSError):
                    f.close()
            self.files.clear()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()
