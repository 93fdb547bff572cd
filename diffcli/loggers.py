"""Experiment trackers (`logger=tensorboard|mlflow|wandb|csv`, several at once): a run's scalars, pictures, config
and final metrics handed to the ecosystem's tools, beside diffcli's own log.jsonl.

The step loop only puts a record on each tracker's queue; each tracker has a thread of its own that opens it (before
the first step) and writes to it in batches, so a slow or unreachable server never delays a step nor another
tracker. A tracker that fails (a server down, a full disk) is dropped with a warning and the run goes on; a full
queue drops records (counted, warned) instead of waiting.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from . import DiffcliError

log = logging.getLogger("diffcli")

QUEUE = 10_000  # records waiting for the thread: a log row every log_every steps never comes near it
PACE = 1.0  # seconds a tracker's thread rests between writes: what queued meanwhile goes in one batch, and the
# step loop's thread is not kept waiting for the GIL by a busy writer (each torch op releases and retakes it)
RECORD = "loggers.json"  # in the run folder: the tracker runs it was logged to (resume and eval continue them)


@dataclass(frozen=True)
class Sweep:
    """The multirun sweep a job belongs to: its folder (one MLflow experiment, one W&B group) and the keys it varies
    (a job is named by its values of them)."""

    dir: str
    varies: tuple = ()


@dataclass
class RunInfo:
    """What a tracker names a run by: its folder, its name, the sweep it belongs to, its config and overrides."""

    out_dir: Path
    command: str                       # train | eval | distill
    config: dict                       # the resolved config, plain data
    overrides: list = field(default_factory=list)
    sweep: Sweep | None = None         # None: a single run
    start: int = 0                     # a resumed run's first step: later rows of an earlier attempt are dropped
    joins: Path | None = None          # eval: the training run whose tracker runs its metrics join

    @property
    def name(self) -> str:
        """A sweep's job: its number and the values it tries; a single run: its overrides (or its folder)."""
        if self.sweep is not None:
            tried = [o for o in self.overrides if o.split("=", 1)[0].lstrip("+~") in self.sweep.varies]
            return " ".join([f"{self.out_dir.name}:", *tried])
        return " ".join(self.overrides) or self.out_dir.name

    @property
    def group(self) -> str | None:
        """The sweep's folder (its MLflow experiment, its W&B group), or None."""
        return None if self.sweep is None else self.sweep.dir


def chosen(settings) -> list[str]:
    """The loggers a `logger` node selects, in BACKENDS's order."""
    return [name for name in BACKENDS if settings is not None and settings.get(name) is not None]


def installed(module: str) -> bool:
    """Whether `module` can be imported (a package blocked in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def check_installed(settings) -> None:
    """A chosen logger whose library is missing is refused before any work, naming the pip install."""
    for name in chosen(settings):
        module = BACKENDS[name].module  # its package and diffcli's extra of the same name
        if module is not None and not installed(module):
            raise DiffcliError(f"logger={name} needs the {module} package, which is not installed: "
                               f"pip install 'diffcli[{module}]'")


def flat(config, prefix: str = "") -> dict:
    """A nested config as {"train.lr": 0.001, ...}: lists and None as text (what every tracker's params accept)."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}.")
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


class Trackers:
    """The chosen trackers, each behind its own writer thread (a hung server holds up only its own tracker); every
    method returns at once."""

    def __init__(self, settings, run: RunInfo):
        self.names = chosen(settings)
        self.flush_timeout = float(settings.flush_timeout) if settings is not None else 0.0
        self.workers = [Worker(BACKENDS[name](settings[name], run)) for name in self.names]

    def wait_open(self) -> None:
        """Wait (at most logger.flush_timeout seconds) until every tracker has started or failed: importing and
        opening them (MLflow's database, W&B's service) is seconds of Python that would otherwise run beside the
        first steps and slow them."""
        t0 = time.monotonic()
        for worker in self.workers:
            if not worker.opened.wait(max(0.0, t0 + self.flush_timeout - time.monotonic())):
                log.warning("logger %s: not started after logger.flush_timeout=%gs; training goes on, it catches up "
                            "if it can", worker.backend.name, self.flush_timeout)
        if self.workers:
            log.info("logger: %s started in %.1f s", ", ".join(self.names), time.monotonic() - t0)

    def _put(self, *call) -> None:
        for worker in self.workers:
            worker.put(call)

    def scalars(self, step: int, values: dict) -> None:
        """Numbers at a step (None and non-numbers are left out)."""
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._put("scalars", [(step, values)])

    def picture(self, step: int, tag: str, file: Path) -> None:
        self._put("picture", step, tag, Path(file))

    def artifact(self, file: Path) -> None:
        self._put("artifact", Path(file))

    def finish(self, metrics: dict) -> None:
        """The run's final metrics, as final/<name> (TensorBoard's hparams, MLflow's metrics, W&B's summary)."""
        self._put("finish", {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def close(self, status: str = "FINISHED") -> None:
        """Write what is queued (at most logger.flush_timeout seconds in all) and end the tracker runs."""
        deadline = time.monotonic() + self.flush_timeout
        for worker in self.workers:
            worker.put(("close", status))
        for worker in self.workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                log.warning("logger %s: still writing after logger.flush_timeout=%gs (%d records waiting); left "
                            "behind", worker.backend.name, self.flush_timeout, worker.queue.qsize())
            if worker.dropped:
                log.warning("logger %s: %d records dropped (it fell behind)", worker.backend.name, worker.dropped)


class Worker:
    """One tracker and the thread that opens it and writes to it from a queue; a failure drops the tracker."""

    def __init__(self, backend):
        self.backend, self.dropped, self.queue, self.opened = backend, 0, queue.Queue(QUEUE), threading.Event()
        self.thread = threading.Thread(target=self._work, name=f"diffcli-{backend.name}", daemon=True)
        self.thread.start()

    def put(self, call: tuple) -> None:
        if not self.thread.is_alive():
            return
        try:
            self.queue.put_nowait(call)
        except queue.Full:  # never wait: the step loop goes on, the record is counted as lost
            self.dropped += 1

    def _work(self) -> None:
        alive = _safely(self.backend, "open")
        self.opened.set()
        while True:
            calls = [self.queue.get()]
            while len(calls) < QUEUE:
                try:
                    calls.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            for call in _merged(calls):
                alive = alive and _safely(self.backend, *call)
                if call[0] == "close":
                    return
            time.sleep(PACE)


def _merged(calls: list) -> list:
    """Consecutive `scalars` calls as one (their rows in order): one batch for the tracker."""
    out = []
    for call in calls:
        if call[0] == "scalars" and out and out[-1][0] == "scalars":
            out[-1] = ("scalars", out[-1][1] + call[1])
        else:
            out.append(call)
    return out


def _safely(backend, method: str, *args) -> bool:
    """Call a tracker; a failure is a warning and the tracker is dropped (False)."""
    try:
        getattr(backend, method)(*args)
        return True
    except Exception as e:  # a tracker's errors are many (network, disk, its own checks): none stops the run
        from .data import one_line

        log.warning("logger %s failed (%s: %s); the run goes on without it", backend.name, type(e).__name__,
                    one_line(e) or type(e).__name__)
        if method != "close":
            try:
                backend.close("FAILED")
            except Exception:
                pass
        return False


def read_record(run_dir: Path) -> dict:
    """The tracker runs a run folder was logged to (loggers.json), {} if none or unreadable."""
    try:
        record = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


_RECORD_LOCK = threading.Lock()


def _remember(run_dir: Path, name: str, value: dict) -> None:
    """Add one tracker's run to loggers.json."""
    from .runs import write_text

    with _RECORD_LOCK:
        write_text(run_dir / RECORD, json.dumps(read_record(run_dir) | {name: value}, indent=2))


class Tracker:
    """What a tracker does with each call; one that has no use for a call leaves it as this does nothing."""

    name: str
    module: str | None  # the package it needs (and diffcli's extra of the same name); None: none

    def __init__(self, settings, run: RunInfo):
        self.settings, self.run = settings, run

    def open(self) -> None:
        pass

    def scalars(self, rows: list) -> None:
        """[(step, {name: value})] in order."""

    def picture(self, step: int, tag: str, file: Path) -> None:
        pass

    def artifact(self, file: Path) -> None:
        pass

    def finish(self, metrics: dict) -> None:
        pass

    def close(self, status: str) -> None:
        pass


class TensorBoard(Tracker):
    """Event files in the run folder (`tensorboard --logdir outputs/` compares every run); its files are there
    already, so artifacts are left as they are."""

    name = module = "tensorboard"

    writer = None

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier attempt of a resumed run logged after its checkpoint
        self.writer = SummaryWriter(str(self.run.out_dir), purge_step=self.run.start or None, flush_secs=10)
        text = json.dumps(self.run.config, indent=2)
        self.writer.add_text("config", "\n".join(f"    {line}" for line in text.splitlines()), self.run.start)

    def scalars(self, rows: list) -> None:
        for step, values in rows:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def picture(self, step: int, tag: str, file: Path) -> None:
        from .data import read_image

        if self.settings.images:
            self.writer.add_image(tag, read_image(file, "RGB"), step, dataformats="HWC")

    def finish(self, metrics: dict) -> None:
        """The config as hyperparameters against the final metrics (TensorBoard's HPARAMS tab)."""
        from torch.utils.tensorboard.summary import hparams

        params = {k: v for k, v in flat(self.run.config).items() if not k.startswith(("logger.", "hydra."))}
        for summary in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary)
        self.scalars([(0, metrics)])

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow(Tracker):
    """One MLflow run per diffcli run (a sweep: one experiment, a run per job) in a tracking store."""

    name = module = "mlflow"
    client = run_id = None

    def open(self) -> None:
        uri = tracking_uri(self.settings.tracking_uri)
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (store migrations) would crowd the run's log
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(uri)
        self.run_id = self._joined(uri) or self._new_run(uri)
        _remember(self.run.out_dir, "mlflow", {"tracking_uri": uri, "run_id": self.run_id})

    def _joined(self, uri: str) -> str | None:
        """The tracker run to continue: a resumed run's own, or for eval the training run's, in this store."""
        source = self.run.joins or (self.run.out_dir if self.run.start else None)
        record = read_record(source).get("mlflow", {}) if source is not None else {}
        if record.get("tracking_uri") != uri or not isinstance(record.get("run_id"), str):
            return None
        if not self.run.joins:  # a resumed run's own: running again (an evaluation leaves the run's status alone)
            self.client.update_run(record["run_id"], status="RUNNING")
        return record["run_id"]

    def _new_run(self, uri: str) -> str:
        from mlflow.entities import Param

        name = self.settings.experiment or self.run.group or f"diffcli {self.run.command}"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name, _artifacts_beside(uri))
        tags = {"diffcli.run_dir": str(self.run.out_dir), "diffcli.command": self.run.command,
                "diffcli.overrides": " ".join(self.run.overrides)}
        run_id = self.client.create_run(experiment, run_name=self.run.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat(self.run.config).items() if not k.startswith("hydra.")]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[i:i + 100])
        return run_id

    def scalars(self, rows: list) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def picture(self, step: int, tag: str, file: Path) -> None:
        self.client.log_artifact(self.run_id, str(file), artifact_path=self._folder(tag))

    def artifact(self, file: Path) -> None:
        if file.suffix != ".safetensors" or self.settings.checkpoint:
            self.client.log_artifact(self.run_id, str(file), artifact_path=self._folder(None))

    def _folder(self, tag: str | None) -> str | None:
        """Where a file goes among the run's artifacts: an evaluation's under eval/<its folder>/."""
        where = [f"eval/{self.run.out_dir.name}"] if self.run.joins else []
        return "/".join([*where, *([tag] if tag else [])]) or None

    def finish(self, metrics: dict) -> None:
        self.scalars([(0, metrics)])

    def close(self, status: str) -> None:
        if self.run_id is not None and not self.run.joins:
            self.client.set_terminated(self.run_id, status=status)


def tracking_uri(uri: str) -> str:
    """A tracking URI as MLflow should see it: a relative SQLite file made absolute (with its folder created), a
    server checked for a listener first (an unreachable one fails in seconds, not after MLflow's minutes of retries)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        file = Path(uri[len("sqlite:///"):]).resolve()
        file.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{file}"
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=5):
            pass
    return uri


def _artifacts_beside(uri: str) -> str | None:
    """A local SQLite store keeps its artifacts in mlartifacts/ beside the database (None: the store's default)."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


class Wandb(Tracker):
    """A Weights & Biases run, offline by default (logger.wandb.mode): `wandb sync <run>/wandb/offline-run-*`."""

    name = module = "wandb"
    wandb_run = None

    def open(self) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and warnings would land on the run's console
        import wandb

        record = read_record(self.run.out_dir).get("wandb", {}) if self.run.start else {}
        group = self.run.group or (str(self.run.joins) if self.run.joins else None)
        self.wandb_run = wandb.init(
            project=self.settings.project, entity=self.settings.entity, mode=self.settings.mode,
            dir=str(self.run.out_dir), name=self.run.name, group=group, job_type=self.run.command,
            config=self.run.config, id=record.get("id"), resume="allow" if record.get("id") else None,
            settings=wandb.Settings(silent=True, console="off"))
        _remember(self.run.out_dir, "wandb", {"id": self.wandb_run.id, "dir": str(self.wandb_run.dir)})

    def scalars(self, rows: list) -> None:
        for step, values in rows:
            self.wandb_run.log(values, step=step)

    def picture(self, step: int, tag: str, file: Path) -> None:
        import wandb

        if self.settings.images:
            self.wandb_run.log({tag: wandb.Image(str(file))}, step=step)

    def artifact(self, file: Path) -> None:
        if file.suffix != ".safetensors":
            self.wandb_run.save(str(file), base_path=str(file.parent), policy="now")

    def finish(self, metrics: dict) -> None:
        self.wandb_run.summary.update(metrics)

    def close(self, status: str) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)


class Csv(Tracker):
    """metrics.csv in the run folder: a row per step, a column per scalar (a new scalar rewrites the header)."""

    name, module = "csv", None

    def __init__(self, settings, run: RunInfo):
        super().__init__(settings, run)
        self.file, self.rows, self.columns = run.out_dir / "metrics.csv", [], ["step"]

    def open(self) -> None:
        if self.run.start and self.file.exists():  # a resumed run keeps the rows up to its checkpoint
            with open(self.file, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.run.start]
            self.columns = list(dict.fromkeys(["step", *(k for r in self.rows for k in r)]))
        self._write()

    def scalars(self, rows: list) -> None:
        new = [{"step": step} | values for step, values in rows]
        self.rows += new
        added = [k for row in new for k in row if k not in self.columns]
        if added:
            self.columns += list(dict.fromkeys(added))
            self._write()
        else:
            with open(self.file, "a", newline="") as fh:
                csv.DictWriter(fh, self.columns).writerows(new)

    def _write(self) -> None:
        from .runs import atomic_file

        with atomic_file(self.file) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb, "csv": Csv}
