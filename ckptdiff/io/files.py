"""Opening and reading files defensively: regular files only, positioned reads, no mmap, bounded side files.

A named pipe given as a checkpoint would block ``open`` forever and a device would never end, so files are
opened non-blocking and refused unless they are regular. Reads are ``preadv`` into caller-owned buffers: a
file truncated while it is read gives a short read (an :class:`~ckptdiff.errors.InputError`), where a memory
map would kill the process with SIGBUS.

Side files (an index JSON, ``config.json``, a rules TOML) are small text files that come with a checkpoint or
a run, so they are read here too, whole and within bounds: :func:`read_side_file` opens one only if it is a
regular file and refuses one larger than the cap for its kind (``MAX_INDEX_BYTES``, ``MAX_CONFIG_BYTES``);
:func:`parse_json` and :func:`parse_toml` refuse nesting deeper than ``MAX_NESTING`` before the parser (which
recurses) sees it, and an integer longer than Python reads. Each failure is one line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptdiff.errors import InputError

if TYPE_CHECKING:  # numpy and torch load only where tensors are read: a bad path fails before either loads
    import numpy as np
    import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
MIB = 1024 * 1024
MAX_INDEX_BYTES = 256 * MIB  # a checkpoint index: the largest real ones (100,000s of tensors) are tens of MB
MAX_CONFIG_BYTES = 8 * MIB  # config.json, a rules TOML, pyproject.toml: real ones are kilobytes
MAX_NESTING = 64  # nested arrays, objects or tables: real side files nest a few levels
NAME_MAX = 255  # bytes in one path component (Linux's limits, which most systems share)
PATH_MAX = 4096  # bytes in a whole path
TOO_LONG = f"the path is too long (at most {NAME_MAX} bytes a name and {PATH_MAX} in all); use a shorter path"


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def os_error(doing: str, e: OSError) -> InputError:
    """The one-line error for ``e``, met while ``doing`` ("cannot open config file x.toml"); a path too long
    for the system (ENAMETOOLONG) says the limits."""
    if e.errno == errno.ENAMETOOLONG:
        return InputError(f"{doing}: {TOO_LONG}")
    if e.errno == errno.ENOENT:
        return InputError(f"{doing}: it does not exist; check the path")
    return InputError(f"{doing}: {e.strerror}; check the path and permissions")


def stat_input(spec: str) -> os.stat_result | None:
    """What the local path ``spec`` names, or None if nothing; :class:`InputError` if it cannot be a checkpoint.

    Checked before anything is opened: a symbolic-link loop, a dangling link, a path that cannot be accessed,
    and anything but a regular file or a folder (a named pipe would block ``open`` forever, a device never end).
    """
    path = Path(spec).expanduser()
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if path.is_symlink():
            raise InputError(f"{spec} is a symbolic link to a path that does not exist; fix the link") from None
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(
                f"{spec} is a symbolic link loop (following it never reaches a file); fix or remove the link"
            ) from None
        raise os_error(f"cannot access {spec}", e) from None
    except ValueError:  # an embedded NUL byte
        raise InputError(f"{spec!r} is not a valid path (it contains a NUL byte)") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InputError(
            f"{spec} is {kind(st.st_mode)}, not a checkpoint file or folder; pass a regular file, a folder or a Hub id"
        )
    return st


def refuse_too_long(path: Path | str, doing: str) -> None:
    """:class:`InputError` if the system refuses ``path`` as too long; anything else is the caller's to find."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise os_error(doing, e) from None
    except ValueError:  # a NUL byte: the caller's own open or stat says so
        pass


def open_regular(path: Path | str, what: str, fix: str = "pass a checkpoint file") -> tuple[int, os.stat_result]:
    """A read-only descriptor for ``path`` and its stat; :class:`InputError` unless it is a regular file.

    ``what`` names the file in messages ("safetensors file x.safetensors"); ``fix`` says what to pass instead of
    a pipe, a device or a folder.
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as e:
        raise os_error(f"cannot open {what}", e) from None
    except ValueError:
        raise InputError(f"cannot open {what}: the path contains a NUL byte") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what} is {kind(st.st_mode)}, not a regular file; {fix}")
    return fd, st


def reopen(path: Path | str, what: str, identity: tuple[int, int]) -> int:
    """Open ``path`` again for data reads; :class:`InputError` if it is no longer the file first opened."""
    fd, st = open_regular(path, what)
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        raise InputError(f"{what} was replaced while ckptdiff was reading it; rerun once it is no longer written")
    return fd


def pread_into(fd: int, view: memoryview, pos: int) -> int:
    """Fill ``view`` from byte ``pos`` of ``fd``; the number of bytes read, short only at the end of the file."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], pos + done)
        except InterruptedError:  # pragma: no cover - retried by Python itself since PEP 475
            continue
        if got <= 0:
            break
        done += got
    return done


def pread_bytes(fd: int, n: int, pos: int) -> bytes:
    """Up to ``n`` bytes from byte ``pos`` (fewer only at the end of the file)."""
    buf = bytearray(n)
    got = pread_into(fd, memoryview(buf), pos)
    return bytes(buf[:got])


def read_tensor_bytes(fd: int, buf: np.ndarray, pos: int, what: str, name: str) -> None:
    """Fill ``buf`` from byte ``pos``: a short read means the file shrank after its header was checked."""
    try:
        got = pread_into(fd, memoryview(buf), pos)  # type: ignore[arg-type]
    except OSError as e:
        raise InputError(f"cannot read tensor {name!r} from {what}: {e.strerror}; check the file") from None
    if got < len(buf):
        raise InputError(
            f"{what} ended early while reading tensor {name!r} (was it truncated or rewritten while ckptdiff "
            "read it?); rerun on a complete file"
        )


def as_dtype(buf: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``buf``'s bytes viewed as a flat tensor of ``dtype`` (no copy)."""
    import torch

    if buf.size == 0:  # an empty numpy buffer has a zero stride, which torch cannot view as another dtype
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)


# ---------------------------------------------------------------------------------------------
# side files: JSON and TOML read whole, within bounds

# TOML strings (multi-line ones first) and comments, whose brackets do not nest: a '#' in a string is no comment
_TOML_SKIP = re.compile(
    rb'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\n]*\'|#[^\n]*', re.DOTALL
)
# Nesting scans translate text to one byte per bracket: +1 an opener, -1 (as int8) a closer, 0 a JSON quote.
_STEPS = bytes.maketrans(b'"[{]}', b"\x00\x01\x01\xff\xff")
_NOT_JSON_STEPS = bytes(b for b in range(256) if b not in b'"[]{}')
_NOT_TOML_STEPS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 22  # steps per numpy pass: a few arrays of 32 MiB at most


def read_side_file(path: Path | str, what: str, max_bytes: int, fix: str) -> bytes:
    """The bytes of side file ``path`` (``what`` names it), refused unless it is a regular file of at most
    ``max_bytes``; ``fix`` says what to do about a bad one."""
    fd, st = open_regular(path, what, fix)
    try:
        if st.st_size > max_bytes:
            raise InputError(
                f"{what} is {st.st_size:,} bytes, more than the {max_bytes // MIB} MiB ckptdiff reads of such a file; "
                f"{fix}"
            )
        raw = pread_bytes(fd, st.st_size + 1, 0)  # one byte more: a file that grows after the stat is seen
    except OSError as e:
        raise os_error(f"cannot read {what}", e) from None
    finally:
        os.close(fd)
    if len(raw) > st.st_size:
        raise InputError(f"{what} grew while ckptdiff read it; rerun once it is no longer written")
    return raw


def nested_deeper(raw: bytes, limit: int = MAX_NESTING, *, toml: bool = False) -> bool:
    """Whether the arrays and objects (TOML: arrays and tables) of ``raw`` nest more than ``limit`` levels, brackets
    in strings (and TOML comments) not counted: a scan that never recurses, run before a parser that does."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # it cannot nest deeper than it opens
    if toml:
        return _depth(_TOML_SKIP.sub(b"", raw).translate(_STEPS, _NOT_TOML_STEPS)) > limit
    # JSON: with escaped backslashes and then escaped quotes gone, every quote left opens or closes a string
    return _depth(raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_STEPS, _NOT_JSON_STEPS)) > limit


def _depth(steps: bytes) -> int:
    """The deepest nesting of ``steps`` (see ``_STEPS``; brackets between quotes do not count), by numpy in chunks."""
    import numpy as np

    # Two adjacent quotes (an empty string, or a string's end and the next one's start) hold no bracket, and
    # dropping both changes no other quote's parity: most strings go, and often every quote with them.
    steps = steps.replace(b"\x00\x00", b"")
    quoted = b"\x00" in steps
    every = np.frombuffer(steps, dtype=np.int8)
    deepest = level = quotes = 0
    for start in range(0, len(every), _CHUNK):
        part = every[start : start + _CHUNK]
        if quoted:
            seen = np.cumsum(part == 0, dtype=np.int64) + quotes  # quotes up to each step: odd inside a string
            part = np.where(seen & 1 == 0, part, 0)
            quotes = int(seen[-1])
        walk = np.cumsum(part, dtype=np.int64) + level  # the depth after each step
        deepest = max(deepest, int(walk.max()))
        level = int(walk[-1])
    return deepest


def _text(raw: bytes, what: str, form: str, fix: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not UTF-8 text (at byte {e.start}), as {form} must be; {fix}") from None


def _too_deep(what: str, nests: str, fix: str) -> InputError:
    return InputError(f"{what}: {nests} nested more than {MAX_NESTING} levels deep; {fix}")


def _too_long_int(what: str, fix: str) -> InputError:
    digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
    return InputError(f"{what}: an integer of more than {digits:,} digits, longer than Python reads; {fix}")


def parse_json(raw: bytes, what: str, fix: str) -> Any:
    """JSON ``raw`` (side file ``what``) decoded: UTF-8, nesting at most ``MAX_NESTING``, integers Python reads."""
    text = _text(raw, what, "JSON", fix)
    if nested_deeper(raw):
        raise _too_deep(what, "arrays or objects", fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except ValueError:  # int() refuses a number of more than 4,300 digits
        raise _too_long_int(what, fix) from None
    except RecursionError:  # pragma: no cover - the nesting scan refuses such a file first
        raise _too_deep(what, "arrays or objects", fix) from None


def parse_toml(raw: bytes, what: str, fix: str) -> dict[str, Any]:
    """TOML ``raw`` (side file ``what``) decoded: UTF-8, nesting at most ``MAX_NESTING``, integers Python reads."""
    text = _text(raw, what, "TOML", fix)
    if nested_deeper(raw, toml=True):
        raise _too_deep(what, "arrays or inline tables", fix)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{what}: not valid TOML ({e}); {fix}") from None
    except ValueError:  # int() refuses a number of more than 4,300 digits
        raise _too_long_int(what, fix) from None
    except RecursionError:  # pragma: no cover - the nesting scan refuses such a file first
        raise _too_deep(what, "arrays or inline tables", fix) from None


def load_json(path: Path | str, what: str, max_bytes: int, fix: str) -> Any:
    """Side file ``path`` read (:func:`read_side_file`) and decoded (:func:`parse_json`)."""
    return parse_json(read_side_file(path, what, max_bytes, fix), what, fix)


def load_toml(path: Path | str, what: str, fix: str) -> dict[str, Any]:
    """TOML side file ``path`` (at most ``MAX_CONFIG_BYTES``) read and decoded (:func:`parse_toml`)."""
    return parse_toml(read_side_file(path, what, MAX_CONFIG_BYTES, fix), what, fix)
