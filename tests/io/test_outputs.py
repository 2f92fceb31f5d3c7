"""Output files: never an input, never twice, through symlinks, with the umask's mode, checked before any work,
written all together or not at all; exact CSV floats; quiet on a closed stdout; SIGTERM cleans up."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import bump_ulps, llama_like, save_sharded, save_single
from typer.testing import CliRunner

from ckptdiff.analyses.base import Report
from ckptdiff.cli import app
from ckptdiff.errors import InputError
from ckptdiff.render.text import to_csv

runner = CliRunner()
SHA = "0123456789abcdef0123456789abcdef01234567"


def _tiny(seed: int = 0) -> dict[str, torch.Tensor]:
    return llama_like(layers=1, d=8, ff=8, vocab=10, seed=seed)


@pytest.fixture
def ckpts(tmp_path: Path) -> dict[str, Path]:
    """base.safetensors, ft.safetensors, ft2.safetensors and a sharded copy of the base, in tmp_path."""
    base = _tiny()
    ft = {k: bump_ulps(v, torch.tensor([0])) for k, v in base.items()}
    ft2 = {k: bump_ulps(v, torch.tensor([1])) for k, v in base.items()}
    save_sharded(base, tmp_path / "sharded", [3, len(base) - 3])
    return {
        "B": save_single(base, tmp_path / "base.safetensors"),
        "F": save_single(ft, tmp_path / "ft.safetensors"),
        "F2": save_single(ft2, tmp_path / "ft2.safetensors"),
        "S": tmp_path / "sharded",
    }


def _digest(folder: Path) -> dict[str, str]:
    """Every file under folder (links not followed) with its content hash: what a refused run must not touch."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(args: list[str], paths: dict[str, Path], tmp_path: Path) -> list[str]:
    return [str(paths[a]) if a in paths else a.replace("@", str(tmp_path)) for a in args]


def _refused(res: object, *needles: str) -> None:
    stderr: str = res.stderr  # type: ignore[attr-defined]
    assert res.exit_code == 2, (res.exit_code, res.output)  # type: ignore[attr-defined]
    assert stderr.startswith("ckptdiff: error:") and stderr.count("\n") == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


# ---------------------------------------------------------------------------------------------
# 2. an output never replaces an input


@pytest.mark.parametrize(
    ("args", "victim"),
    [
        (["sparsity", "B", "F", "--csv", "F"], "F"),
        (["sparsity", "B", "F", "--json", "B"], "B"),
        (["principal-overlap", "--k", "2", "B", "F", "--save-masks", "F"], "F"),
        (["spectral", "--k", "2", "B", "F", "--save-spectra", "B"], "B"),
        (["check", "-r", "sparsity >= 0", "B", "F", "--json", "F"], "F"),
        (["consistency", "B", "F", "F2", "--csv", "F2"], "F2"),
        (["sparsity", "S", "F", "--csv", "@/sharded/model-00002-of-00002.safetensors"], "S"),
        (["sparsity", "S", "F", "--json", "@/sharded/model.safetensors.index.json"], "S"),
        (["sparsity", "@/sharded/model.safetensors.index.json", "F", "--csv", "@/sharded/../ft.safetensors"], "F"),
    ],
)
def test_output_naming_an_input_is_refused(
    args: list[str], victim: str, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    before = _digest(tmp_path)
    res = runner.invoke(app, [*_fill(args, ckpts, tmp_path), "--quiet"])
    _refused(res, "input")
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_output_reaching_an_input_through_a_link_is_refused(kind: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "out.csv"
    if kind == "symlink":
        link.symlink_to(ckpts["F"])
    else:
        os.link(ckpts["F"], link)
    before = _digest(tmp_path)
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(link), "-q"])
    _refused(res, str(link))
    assert _digest(tmp_path) == before


def test_output_naming_the_rules_file_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('rules = ["sparsity >= 0"]\n')
    args = ["check", str(ckpts["B"]), str(ckpts["F"]), "--config", str(rules), "--json", str(rules), "-q"]
    res = runner.invoke(app, args)
    _refused(res, str(rules))
    assert rules.read_text() == 'rules = ["sparsity >= 0"]\n'


def test_output_inside_a_hub_snapshot_is_refused(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache" / "models--acme--tiny"
    blob = folder / "blobs" / "b1"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(ckpts["B"].read_bytes())
    snap = folder / "snapshots" / SHA
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "b1")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = snap / "model.safetensors"
    res = runner.invoke(app, ["sparsity", "acme/tiny", str(ckpts["F"]), "--csv", str(target), "-q"])
    _refused(res, str(target))
    assert target.is_symlink() and blob.read_bytes() == ckpts["B"].read_bytes()


def test_library_refuses_masks_over_an_input(ckpts: dict[str, Path]) -> None:
    from ckptdiff.analyses.principal import principal_overlap

    before = ckpts["F"].read_bytes()
    with pytest.raises(InputError, match="input"):
        principal_overlap(str(ckpts["B"]), str(ckpts["F"]), k=2, save_masks=ckpts["F"], progress=False)
    assert ckpts["F"].read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "chardev", "directory"])
def test_non_regular_destination_is_refused(kind: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "chardev":
        try:
            os.mknod(dest, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs privileges")
    else:
        dest.mkdir()
    mode = os.lstat(dest).st_mode
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(dest), "-q"])
    _refused(res, str(dest))
    assert os.lstat(dest).st_mode == mode


@pytest.mark.parametrize(
    "args",
    [
        ["sparsity", "B", "F", "--csv", "@/x", "--json", "@/x"],
        ["sparsity", "B", "F", "--csv", "@/x", "--json", "@/sub/../x"],
        ["principal-overlap", "--k", "2", "B", "F", "--save-masks", "@/x", "--csv", "@/x"],
        ["spectral", "--k", "2", "B", "F", "--save-spectra", "@/x", "--json", "@/x"],
    ],
)
def test_two_outputs_naming_one_file_are_refused(args: list[str], ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    res = runner.invoke(app, [*_fill(args, ckpts, tmp_path), "-q"])
    _refused(res, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_two_outputs_that_are_hard_links_of_one_file_are_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("old\n")
    os.link(tmp_path / "a.csv", tmp_path / "b.json")
    args = ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(tmp_path / "a.csv")]
    res = runner.invoke(app, [*args, "--json", str(tmp_path / "b.json"), "-q"])
    _refused(res, "same file")
    assert (tmp_path / "a.csv").read_text() == "old\n"


# ---------------------------------------------------------------------------------------------
# 3. output files


@pytest.mark.parametrize("existing", [True, False])
def test_symlinked_output_is_written_through(existing: bool, ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "3.csv"
    if existing:
        target.write_text("old\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(Path("runs") / "3.csv")
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(link), "-q"])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(Path("runs") / "3.csv")
    assert target.read_text().startswith("tensor,")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["3.csv"]  # no temporary left beside it


@pytest.fixture
def umask() -> Callable[[int], None]:
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask  # type: ignore[misc]
    os.umask(old)


@pytest.mark.parametrize(
    ("args", "outs"),
    [
        (["sparsity", "B", "F", "--csv", "@/o.csv", "--json", "@/o.json"], ["o.csv", "o.json"]),
        (["principal-overlap", "--k", "2", "B", "F", "--save-masks", "@/m.safetensors"], ["m.safetensors"]),
        (["spectral", "--k", "2", "B", "F", "--save-spectra", "@/s.safetensors"], ["s.safetensors"]),
        (["check", "-r", "sparsity >= 0", "B", "F", "--json", "@/c.json"], ["c.json"]),
    ],
)
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_output_modes_follow_the_umask(
    args: list[str], outs: list[str], mask: int, umask: Callable[[int], None], ckpts: dict[str, Path], tmp_path: Path
) -> None:
    umask(mask)
    res = runner.invoke(app, [*_fill(args, ckpts, tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    for name in outs:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_unwritable_destination_fails_before_any_checkpoint_is_read(ckpts: dict[str, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 3)  # reading it would fail with a message about the checkpoint
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(corrupt), "--json", "/proc/ckptdiff-x.json", "-q"])
    _refused(res, "/proc/ckptdiff-x.json")
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--json", "/proc/ckptdiff-x.json"])
    _refused(res, "/proc/ckptdiff-x.json")


def test_read_only_folder_fails_before_any_checkpoint_is_read(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptdiff.io.outputs

    def read_only(target: Path) -> tuple[int, Path]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(ckptdiff.io.outputs, "_create_temp", read_only)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 3)
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(corrupt), "--csv", str(tmp_path / "o.csv"), "-q"])
    _refused(res, str(tmp_path / "o.csv"), "read-only")


@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "link"])
def test_descriptor_links_are_refused_not_followed(name: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    """/dev/stdout is a link to whatever stdout is open on; following it would replace the shell's `> file`."""
    from ckptdiff.io.outputs import OutputSet

    if name == "link":
        (tmp_path / "link").symlink_to("/proc/self/fd/1")
        name = str(tmp_path / "link")
    with pytest.raises(InputError, match="device or process file"):
        OutputSet([str(ckpts["B"])]).add("--csv", name)


def _failing_fsync(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make the nth os.fsync (and every later one) fail as a full disk would."""
    real = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) >= nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_is_one_line_and_leaves_nothing(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "o.csv"
    out.parent.mkdir()
    _failing_fsync(monkeypatch, 1)
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(out), "-q"])
    _refused(res, str(out), "the disk is full")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "said"),
    [(errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"), (errno.EROFS, "read-only")],
)
def test_a_write_error_says_its_cause_once(code: int, said: str) -> None:
    """Not "Permission denied; permission denied: check ..." (issue 23 item 18)."""
    from ckptdiff.io.outputs import write_error

    message = str(write_error("--csv", Path("h2/ro/x.csv"), OSError(code, os.strerror(code))))
    assert message.startswith("cannot write --csv h2/ro/x.csv: ")
    assert message.lower().count(said) == 1, message
    assert os.strerror(code).lower() not in message.lower() or os.strerror(code).lower() == said, message


def test_a_write_error_without_advice_keeps_the_systems_words() -> None:
    from ckptdiff.io.outputs import write_error

    message = str(write_error("--json", Path("x.json"), OSError(errno.EIO, os.strerror(errno.EIO))))
    assert message == f"cannot write --json x.json: {os.strerror(errno.EIO)}; pick another path"


def test_outputs_land_together_or_not_at_all(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _failing_fsync(monkeypatch, 2)  # the CSV is complete, the JSON fails
    args = ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(out / "o.csv"), "--json", str(out / "o.json")]
    res = runner.invoke(app, [*args, "-q"])
    _refused(res, str(out / "o.json"))
    assert list(out.iterdir()) == []


def test_masks_are_not_left_without_their_csv(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _failing_fsync(monkeypatch, 2)  # the masks are complete, the CSV fails
    args = ["principal-overlap", "--k", "2", str(ckpts["B"]), str(ckpts["F"]), "--save-masks", str(out / "m")]
    res = runner.invoke(app, [*args, "--csv", str(out / "o.csv"), "-q"])
    assert res.exit_code == 2, res.output
    assert list(out.iterdir()) == []


def test_csv_floats_round_trip_exactly(tmp_path: Path) -> None:
    value = 1 - 5 / 16_777_216
    frame = pd.DataFrame({"tensor": ["a", "b"], "sparsity": [value, 0.1], "f32": pd.array([0.1, 1 / 3], "float32")})
    text = to_csv(Report("t", {}, [], [], frame))
    (tmp_path / "x.csv").write_text(text)
    back = pd.read_csv(tmp_path / "x.csv")
    assert back["sparsity"].tolist() == [value, 0.1]
    assert back["f32"].tolist() == [float(v) for v in frame["f32"]]
    cell = text.splitlines()[1].split(",")[1]
    assert float(cell) == value


def test_cli_csv_sparsity_of_one_change_in_a_million(tmp_path: Path) -> None:
    w = torch.randn(1024, 1024).bfloat16()
    b = save_single({"w": w}, tmp_path / "b.safetensors")
    f = save_single({"w": bump_ulps(w, torch.tensor([7]))}, tmp_path / "f.safetensors")
    res = runner.invoke(app, ["sparsity", str(b), str(f), "--csv", str(tmp_path / "o.csv"), "-q"])
    assert res.exit_code == 0, res.output
    header, row = (tmp_path / "o.csv").read_text().splitlines()
    cell = row.split(",")[header.split(",").index("sparsity")]
    assert float(cell) == 1 - 1 / 1024**2


# ---------------------------------------------------------------------------------------------
# processes: a closed stdout, and SIGTERM mid-run


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CKPTDIFF_DEBUG": ""}


def test_closed_stdout_is_quiet_and_keeps_the_exit_status(ckpts: dict[str, Path], tmp_path: Path) -> None:
    runs = {
        "csv": ([*map(str, ["sparsity", ckpts["B"], ckpts["F"]]), "-f", "csv", "-q"], 0),
        "table": ([*map(str, ["sparsity", ckpts["B"], ckpts["F"]]), "-q"], 0),
        "check-fails": ([*map(str, ["check", ckpts["B"], ckpts["F"]]), "-r", "sparsity >= 1", "-q"], 1),
    }
    procs = {}
    for name, (args, _) in runs.items():
        r, w = os.pipe()
        os.close(r)  # the reader is gone before ckptdiff writes a byte, like `| head` that has had enough
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ckptdiff", *args], stdout=w, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path
        )
        os.close(w)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert (proc.returncode, err.decode()) == (runs[name][1], ""), name


SLOW_COMMIT = """
import pathlib, sys, time
import ckptdiff.io.outputs as o
marker = pathlib.Path(sys.argv[1])
def slow(self):
    marker.write_text("ready")
    time.sleep(60)
o.OutputSet.commit = slow
sys.argv = ["ckptdiff", *sys.argv[2:]]
from ckptdiff.cli import main
main()
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143)])
def test_sigterm_removes_every_temporary(signum: int, code: int, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "marker"
    args = ["principal-overlap", "--k", "2", str(ckpts["B"]), str(ckpts["F"]), "-q"]
    args += ["--save-masks", str(out / "m.safetensors"), "--csv", str(out / "o.csv"), "--json", str(out / "o.json")]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMMIT, str(marker), *args], stderr=subprocess.PIPE, env=_env(), cwd=tmp_path
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.stderr else ""
    assert len(list(out.iterdir())) == 3  # three temporaries, written and waiting for the renames
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.decode().startswith("ckptdiff: error:") and err.decode().count("\n") == 1, err
    assert list(out.iterdir()) == []


def test_sighup_and_sigterm_interrupt_like_ctrl_c() -> None:
    from ckptdiff.runtime.signals import Interrupted, signals_as_interrupts

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        with pytest.raises(Interrupted) as caught, signals_as_interrupts():
            os.kill(os.getpid(), signum)
            time.sleep(5)
        assert caught.value.signum == signum and isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


BLOCKED_IN_C = r"""
import ctypes, os, signal, sys, threading, time
from ckptdiff.runtime.signals import Interrupted, signals_as_interrupts

libc = ctypes.CDLL(None)  # ctypes releases the GIL; a blocked pthread_mutex_lock never returns to Python
mutex = ctypes.create_string_buffer(64)  # zeroed: a default mutex on glibc
held = threading.Event()


def hold() -> None:
    libc.pthread_mutex_lock(mutex)
    held.set()
    # "ready" only once the main thread waits inside the lock call: glibc's lock word (the mutex's first int) is 2
    # when another thread waits on it. Said earlier, a slow main thread could still be running Python when the
    # signal comes, and rightly take it at once, with nothing to acknowledge.
    word = ctypes.c_int.from_buffer(mutex)
    while word.value != 2:
        time.sleep(0.001)
    print("ready", flush=True)
    sys.stdin.readline()  # the test says when the "long computation" may end
    libc.pthread_mutex_unlock(mutex)


threading.Thread(target=hold, daemon=True).start()
held.wait()
try:  # a first run in this process whose signal is taken at once (the watcher counts per run, not per process);
    # quiet, so that a loaded machine, where taking it may outlast the grace, cannot add a line of its own
    with signals_as_interrupts(speak=False):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
except Interrupted:
    pass
try:
    with signals_as_interrupts():
        libc.pthread_mutex_lock(mutex)  # stands for one long SVD: Python cannot run a signal handler in here
        libc.pthread_mutex_unlock(mutex)
        print("returned", flush=True)
except Interrupted as e:
    print("interrupted", e.signum, flush=True)
    sys.exit(130)
"""


def test_a_signal_during_one_long_call_is_acknowledged_before_the_call_returns() -> None:
    """Ctrl-C inside one long C call (an SVD) says at once that the run stops after it, then stops as usual.

    The "call" is a mutex the test holds, so the line provably arrives while the main thread is still inside
    it: the call is released only after the line was read.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_IN_C],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        ready, _, _ = select.select([proc.stderr], [], [], 30)  # seconds: a bound against a hang, not a timing
        line = proc.stderr.readline() if ready else "(nothing on stderr within 30 s)"
        assert "interrupted: stopping when the step in progress returns" in line, line
        assert proc.poll() is None  # still inside the call
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == f"interrupted {int(signal.SIGINT)}\n"  # the handler still raised, once the call returned
    assert err == ""  # one line in all


def test_temporary_names_say_whose_they_are(tmp_path: Path) -> None:
    from ckptdiff.io import outputs as O

    fd, tmp = O._create_temp(tmp_path / "x.csv")
    os.close(fd)
    assert tmp.name.startswith(".x.csv.ckptdiff-") and tmp.name.endswith(".tmp")
    match = O._TEMP.match(tmp.name)
    assert match is not None and int(match["pid"]) == os.getpid()
    tmp.unlink()


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL or the OOM killer leave `.o.csv.ckptdiff-...tmp` behind; the next run to o.csv removes those whose
    process is gone, and nothing it cannot prove is its own (issue 23 item 15)."""
    import subprocess
    import sys

    from ckptdiff.io import outputs as O

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    folder = tmp_path / "out"
    folder.mkdir()
    stale = folder / f".o.csv.ckptdiff-{O._HOST}-{dead.pid}-0badc0de.tmp"
    other = "0" * 8 if O._HOST != "0" * 8 else "1" * 8
    kept = [
        folder / f".o.csv.ckptdiff-{O._HOST}-{os.getpid()}-0badc0de.tmp",  # a live process: maybe a run in progress
        folder / f".o.csv.ckptdiff-{other}-{dead.pid}-0badc0de.tmp",  # another host's run
        folder / f".other.csv.ckptdiff-{O._HOST}-{dead.pid}-0badc0de.tmp",  # another destination
        folder / ".o.csv.0badc0de.tmp",  # not named by ckptdiff
    ]
    for path in [stale, *kept]:
        path.write_bytes(b"x" * 1000)
    res = runner.invoke(app, ["sparsity", str(ckpts["B"]), str(ckpts["F"]), "--csv", str(folder / "o.csv"), "-q"])
    assert res.exit_code == 0, res.output
    assert not stale.exists()
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["o.csv", *(p.name for p in kept)])


def test_a_killed_runs_temporary_folders_are_removed_by_the_next_run(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """`report -o` and `patch apply` write a folder beside the destination first; after SIGKILL the next run to the
    same destination removes it when its process is gone, and keeps a replaced report's `.old` folder while the
    destination is missing (then it holds the only copy of the earlier report)."""
    import subprocess
    import sys

    from ckptdiff.io import outputs as O

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "runs"
    parent.mkdir()
    stale = parent / f".rep.ckptdiff-{O._HOST}-{dead.pid}-0badc0de.tmp"
    (stale / "figures").mkdir(parents=True)
    (stale / "figures" / "x.svg").write_text("<svg/>")
    old = parent / f".rep.ckptdiff-{O._HOST}-{dead.pid}-0badc0df.old"
    (old / "report").mkdir(parents=True)
    (old / "report" / "report.md").write_text("the only copy")
    live = parent / f".rep.ckptdiff-{O._HOST}-{os.getpid()}-0badc0de.tmp"
    live.mkdir()
    link = parent / f".rep.ckptdiff-{O._HOST}-{dead.pid}-0badc0e0.tmp"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ckptdiff's")
    link.symlink_to(elsewhere, target_is_directory=True)
    # While rep/ is missing, the .old folder is an earlier report's only copy: a removal leaves it.
    assert O.remove_stale(parent / "rep") == [stale]
    assert old.exists() and live.exists() and (elsewhere / "keep.txt").exists()
    # A real run to rep/ (report -o) puts the new report in place; the next run to it removes the stale .old.
    res = runner.invoke(
        app, ["report", str(ckpts["B"]), str(ckpts["F"]), "-o", str(parent / "rep"), "-q", "-a", "sparsity"]
    )
    assert res.exit_code == 0, res.output
    assert (parent / "rep" / "report.md").exists()
    assert O.remove_stale(parent / "rep") == [old]
    assert live.exists() and link.is_symlink() and (elsewhere / "keep.txt").exists()
    # A new temporary folder is named for its destination and this process, and so is found by the next run.
    made = O.temp_folder(parent / "rep")
    match = O._TEMP.match(made.name)
    assert match is not None and match["name"] == "rep" and int(match["pid"]) == os.getpid() and made.is_dir()
    made.rmdir()
