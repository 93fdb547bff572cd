"""Run bookkeeping: run folders (one per run, never shared), the lock a training run holds, the signals that stop
it between steps, its log (log.jsonl, eval.jsonl, a progress bar) and the reading of .jsonl logs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from . import DiffcliError

log = logging.getLogger("diffcli")

_CLAIMED: dict[str, str] = {}
CREATED: dict[str, list[str]] = {}  # a run folder this process created -> the parents it created for it


def missing_folders(path: str) -> list[str]:
    """`path` and those of its parents that do not exist yet, deepest first (absolute)."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p) and p != os.path.dirname(p):
        out.append(p)
        p = os.path.dirname(p)
    return out


def new_dir(path: str) -> str:
    """`path`, or `path_1`, `path_2`, ...: the first that did not exist, created now.

    os.mkdir is atomic, so two runs started in the same second (the run folders are named to the
    second) never share a folder. Memoized: Hydra resolves a run folder more than once per process.
    """
    if path not in _CLAIMED:
        parents = missing_folders(os.path.dirname(path) or ".")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        candidate, k = path, 0
        while True:
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                k += 1
                candidate = f"{path}_{k}"
        _CLAIMED[path] = candidate
        CREATED[os.path.abspath(candidate)] = parents
    return _CLAIMED[path]


def remove_if_unused(run_dir: str) -> None:
    """A run that failed before doing any work leaves no folder behind: its folder (and the parents made for it)
    is removed when this process created it and it holds only Hydra's .hydra/ (or a sweep's multirun.yaml), the
    run's log and its lock."""
    run = os.path.abspath(run_dir)
    if run not in CREATED or not os.path.isdir(run):
        return
    for folder, _, names in os.walk(run):
        where = os.path.relpath(folder, run)
        if where.split(os.sep)[0] != ".hydra" and any(
                where != "." or not (name.endswith(".log") or name in (".diffcli.lock", "multirun.yaml"))
                for name in names):
            return  # the run wrote something of its own
    shutil.rmtree(run, ignore_errors=True)
    for parent in CREATED.pop(run):
        try:
            os.rmdir(parent)  # only while empty: another run may have put its folder there since
        except OSError:
            break


_LOCKS: dict[str, object] = {}


def claim_run_dir(out_dir: Path) -> None:
    """Hold an exclusive lock on the run folder for this process's life: a second run writing
    into the same folder (the same hydra.run.dir, or train.resume of a running run) is refused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".diffcli.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DiffcliError(f"another diffcli train is writing into {out_dir}; wait for it to finish or give "
                           "another folder (hydra.run.dir=...)") from None
    _LOCKS[str(out_dir.resolve())] = handle  # held until release_run_dir, or the end of the process


def release_run_dir(out_dir: Path) -> None:
    handle = _LOCKS.pop(str(out_dir.resolve()), None)
    if handle is not None:
        handle.close()  # closing the file drops the lock


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits.

    Stopping between steps (never inside one) is what makes the saved state exact. A second
    signal exits at once (no traceback): a checkpoint being written then stays a temporary file,
    which the next start of the run deletes, so the older checkpoints are untouched.
    """

    def __init__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            os.write(2, b"diffcli: stopped at once by a second signal; the last checkpoint is the newest complete one\n")
            os._exit(128 + signum)
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Logger:
    """Loss, LR, gradient norm and throughput to log.jsonl; a progress bar or plain log lines."""

    def __init__(self, out_dir: Path, total: int, start: int, trackers=None):
        self.trackers = trackers  # loggers.Trackers: the same rows, handed to TensorBoard, MLflow, ...
        for name in ("log.jsonl", "eval.jsonl"):  # a resumed run: drop rows logged after its checkpoint
            truncate(out_dir / name, start)
        self.file = open(out_dir / "log.jsonl", "a")
        self.eval_file = out_dir / "eval.jsonl"
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def tick(self) -> None:
        """One step done: move the bar (host-side only, no device sync)."""
        if self.bar:
            self.bar.advance(self.task)

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers is not None:
            self.trackers.scalars(record["step"], {f"train/{k}": v for k, v in record.items() if k != "step"})
        loss = "n/a (every step skipped)" if record["loss"] is None else f"{record['loss']:.4f}"
        info = f"loss {loss}  lr {record['lr']:.2e}  {record['it_per_s']:.1f} it/s"
        if self.bar:
            self.bar.update(self.task, info=info)
        else:
            log.info("step %d  %s  grad %.3f", record["step"], info, record["grad_norm"])

    def metrics(self, step: int, metrics: dict) -> None:
        """An evaluation of the EMA weights (train.eval_every) to eval.jsonl."""
        with open(self.eval_file, "a") as fh:
            fh.write(json.dumps({"step": step} | metrics) + "\n")
        if self.trackers is not None:
            self.trackers.scalars(step, {f"ema/{k}": v for k, v in metrics.items()})
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        (self.bar.console.log if self.bar else log.info)(f"eval at step {step}: {text}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        self.file.close()


def truncate(file: Path, step: int) -> None:
    """Keep the rows of a .jsonl log up to `step` (and drop a half-written last line)."""
    if file.exists():
        write_text(file, "".join(json.dumps(row) + "\n" for row in read_jsonl(file) if row["step"] <= step))


def write_text(file: Path, text: str) -> None:
    """`file.write_text(text)` through a temporary renamed into place: a crash or a full disk never leaves half a
    file, and a symlink under that name is replaced, never its target."""
    with atomic_file(file) as tmp:
        tmp.write_text(text)


def write_npz(file: Path, arrays: dict) -> None:
    """np.savez of `arrays` through a temporary renamed into place (atomic_file)."""
    import numpy as np

    with atomic_file(file) as tmp:
        np.savez(tmp, **arrays)


class Silent:
    """The logger of ranks other than 0: they write nothing."""

    def __call__(self, *args):
        pass

    tick = metrics = close = __call__


def read_jsonl(file: Path) -> list[dict]:
    """The rows of a .jsonl log; a line cut short by a crash (or any unreadable line) is skipped."""
    rows = []
    text = file.read_bytes().decode("utf-8", errors="replace") if file.exists() else ""
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # cut short, not JSON, or nested past the parser's stack
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def fmt(value) -> str:
    """A logged or tabulated value as text: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StreamedNpz:
    """An .npz (numpy's uncompressed zip of .npy members) written member by member, the large one in chunks
    (begin, write..., end), into a hidden temporary renamed over `file` by close(): a crash or a full disk never
    leaves a partial file under the real name. Each open member holds one chunk in memory at most."""

    def __init__(self, file):
        import zipfile

        self.file = Path(file)
        self.tmp = self.file.with_name(f".{self.file.name}.partial")
        self.zip = zipfile.ZipFile(self.tmp, "w", allowZip64=True)
        self.member, self.left = None, 0

    def add(self, name: str, array) -> None:
        """A whole member at once."""
        import numpy as np

        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def begin(self, name: str, shape: tuple, dtype) -> None:
        """Open member `name` of this shape and dtype; its rows follow through write()."""
        import numpy as np

        self.dtype = np.dtype(dtype)
        self.member = self.zip.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_2_0(self.member, header)
        self.left = int(np.prod(shape))

    def write(self, rows) -> None:
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.left -= rows.size
        self.member.write(rows.tobytes())

    def end(self) -> None:
        if self.left:
            raise ValueError(f"{self.file}: {self.left} values of the open member were never written")
        self.member.close()
        self.member = None

    def close(self) -> None:
        """Finish the zip and move it into place."""
        self.zip.close()
        os.replace(self.tmp, self.file)

    def discard(self) -> None:
        """Abandon the file (an error or a signal mid-run): the temporary goes, nothing is renamed."""
        try:
            if self.member is not None:
                self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def progress(total: int, what: str):
    """A progress bar of `total` items on a terminal (advance it by calling what this yields); nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda k: bar.advance(task, k)


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: setting it later, even for an instant, would race other threads' files


@contextlib.contextmanager
def atomic_file(path):
    """A fresh temporary beside `path` (same extension, so writers that pick the format from it still do) to write;
    renamed over `path` when the block ends, removed if it raises.

    os.replace replaces whatever has the name, a symlink included, never a symlink's target: a `summary.csv` link
    in a received folder cannot make diffcli overwrite the file it points to. mkstemp's random name (created
    O_EXCL) cannot be a planted link either.
    """
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make the result private, unlike a plain open()
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path, what: str):
    """A fresh temporary folder beside `path` to fill, renamed to `path` when the block ends; if it raises, the
    temporary and any parent folder made for it are removed. An existing `path` is refused: never overwritten."""
    path = Path(path)
    if path.exists():
        raise DiffcliError(f"{path} exists; give a new folder ({what} never overwrites one)")
    created = missing_folders(str(path.parent))  # deepest first
    tmp = path.parent / f".{path.name}.partial{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        raise
