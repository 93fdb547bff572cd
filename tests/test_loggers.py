"""logger=tensorboard|mlflow|wandb|csv: each tracker's own files read back with that library's own reader, against
the run's log.jsonl and metrics.json (no mocks); a tracker that fails costs a warning, never the run."""

import csv
import json
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from conftest import compose_config
from diffcli.evaluate import run_eval
from diffcli.runs import read_jsonl
from diffcli.train import run_train

# 20 steps of a toy, a log row every 5, a picture at 10 and 20; the final evaluation's sampler kept short
TOY = ["data=moons", "train.steps=20", "train.batch_size=64", "train.log_every=5", "train.warmup=3",
       "train.sample_every=10", "train.n_samples=200", "train.eval_every=0", "train.eval_n=300", "train.ckpt_every=10",
       "model=flow", "sampler=euler", "sampler.steps=8", "device=cpu", "objective.metric=sliced_wasserstein"]


def train(tmp_path, *extra, name="run"):
    """A toy run with these loggers; (its folder, log.jsonl rows, metrics.json)."""
    run_dir = tmp_path / name
    run_train(compose_config("train", TOY + list(extra)), run_dir, overrides=list(extra))
    return run_dir, read_jsonl(run_dir / "log.jsonl"), json.loads((run_dir / "metrics.json").read_text())


def test_tensorboard_event_files_hold_the_runs_scalars_pictures_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, rows, record = train(tmp_path, "logger=tensorboard", "train.lr=0.002")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [5, 10, 15, 20]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("train/lr")] == [5, 10, 15, 20]
    assert [e.step for e in events.Images("samples")] == [10, 20]
    final = events.Scalars("final/sliced_wasserstein")
    assert final[-1].value == pytest.approx(record["objective"]["value"], rel=1e-6)
    hparams = events.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in hparams.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    assert start.hparams["train.lr"].number_value == pytest.approx(0.002)
    assert start.hparams["model.name"].string_value == "flow"


def test_mlflow_store_holds_params_metric_history_and_artifacts_and_eval_joins_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, rows, record = train(tmp_path, "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("diffcli train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "20"
    assert run.data.params["model.name"] == "flow" and run.data.tags["diffcli.run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"], rel=1e-12)) for r in rows]
    assert run.data.metrics["final/sliced_wasserstein"] == pytest.approx(record["objective"]["value"], rel=1e-12)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "log.jsonl", "metrics.json", "ema_20.safetensors", "samples"} <= files
    assert len(client.list_artifacts(run.info.run_id, "samples")) == 2
    # the artifacts lie beside the database; the stored metrics.json is the run's own
    stored = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "download")))
    assert json.loads(stored.read_text()) == record and (tmp_path / "mlartifacts").is_dir()

    cfg = compose_config("eval", [f"ckpt={run_dir}", "n=300", "sampler=euler", "sampler.steps=8", "device=cpu",
                                  "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"])
    evaluation = run_eval(cfg, tmp_path / "eval")
    # the same n, seed and sampler: diffcli eval reproduces the run's final evaluation exactly
    assert evaluation["metrics"]["sliced_wasserstein"] == pytest.approx(record["metrics"]["sliced_wasserstein"],
                                                                        rel=1e-12)
    (joined,) = client.search_runs([experiment.experiment_id])  # no second run: the evaluation joined it
    assert joined.info.run_id == run.info.run_id
    (point,) = client.get_metric_history(run.info.run_id, "eval/sliced_wasserstein")
    assert (point.step, point.value) == (20, pytest.approx(evaluation["metrics"]["sliced_wasserstein"], rel=1e-12))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval/eval")} >= {"eval/eval/metrics.json"}


def test_a_resumed_run_continues_its_mlflow_run_and_keeps_its_csv_rows_up_to_the_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = ["logger=[mlflow,csv]", f"logger.mlflow.tracking_uri={uri}"]
    run_dir, _, _ = train(tmp_path, *loggers)
    with open(run_dir / "metrics.csv", "a") as fh:  # rows an attempt logged after its last checkpoint
        fh.write("25,9.0\n")
    more = ["train.steps=30", f"train.resume={run_dir}", *loggers]
    run_train(compose_config("train", TOY + more), tmp_path / "ignored", overrides=more)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("diffcli train").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    with open(run_dir / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    rows = read_jsonl(run_dir / "log.jsonl")
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert [float(r["train/loss"]) for r in table] == [r["loss"] for r in rows]


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (<run>/wandb/offline-run-*/run-*.wandb): W&B's LevelDB-style log of
    32 KiB blocks (a 7-byte file header ':W&B', 0xBEE1, version 0; each chunk: crc32, length, type) holding
    wandb.proto Record messages, parsed with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, records, pending = file.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def finished_wandb_records(run_dir: Path, timeout: float = 60.0) -> list:
    """wandb_records once W&B's own process has written the run's exit record (it writes the file after the run
    returns from finish())."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_wandb_offline_run_records_the_history_config_and_summary(tmp_path):
    run_dir, rows, record = train(tmp_path, "logger=wandb", "train.lr=0.002")
    records = finished_wandb_records(run_dir)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            history.setdefault(int(json.loads(items.get("_step", "0"))), {}).update(items)
    logged = [(step, json.loads(h["train/loss"])) for step, h in sorted(history.items()) if "train/loss" in h]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-12)) for r in rows], history
    assert [step for step, h in sorted(history.items()) if "samples/path" in h] == [10, 20], history  # the images
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    values = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert values["train"]["lr"] == 0.002 and values["model"]["name"] == "flow"
    summaries = [r.summary for r in records if r.WhichOneof("record_type") == "summary"]
    final = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for s in summaries for i in s.update}
    assert final["final/sliced_wasserstein"] == pytest.approx(record["objective"]["value"], rel=1e-12)


def test_csv_holds_a_row_per_logged_step(tmp_path):
    run_dir, rows, _ = train(tmp_path, "logger=csv")
    with open(run_dir / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]
    assert [float(r["train/grad_norm"]) for r in table] == [r["grad_norm"] for r in rows]


def test_several_loggers_at_once(tmp_path):
    cfg = compose_config("train", ["logger=[tensorboard,csv]"])
    assert cfg.logger.tensorboard.images is True and cfg.logger.csv is not None and cfg.logger.mlflow is None


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hung tracking server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    server.close()


def test_an_unreachable_or_hung_tracking_server_costs_a_warning_not_the_run(tmp_path, silent_server, caplog):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with caplog.at_level(logging.WARNING, logger="diffcli"):
        run_dir, rows, record = train(tmp_path, "logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}")
    assert rows[-1]["step"] == 20 and (run_dir / "checkpoints" / "ema_20.safetensors").exists()
    assert any("logger mlflow failed" in r.message and "the run goes on" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffcli"):  # a server that takes the connection, never answers
        run_dir, rows, _ = train(tmp_path, "logger=[mlflow,csv]", f"logger.mlflow.tracking_uri={silent_server}",
                                 "logger.flush_timeout=2", name="hung")
    assert rows[-1]["step"] == 20 and (run_dir / "metrics.csv").exists()  # the csv logger did not wait for it
    assert any("still writing after logger.flush_timeout=2s" in r.message for r in caplog.records)


def test_a_tracker_that_cannot_write_is_dropped_with_a_warning(tmp_path, caplog):
    (tmp_path / "run" / "metrics.csv").mkdir(parents=True)  # where the csv logger writes: a folder, not a file
    with caplog.at_level(logging.WARNING, logger="diffcli"):
        run_dir, rows, _ = train(tmp_path, "logger=[csv,tensorboard]")
    assert rows[-1]["step"] == 20
    assert any("logger csv failed" in r.message for r in caplog.records)
    assert list(run_dir.glob("events.out.tfevents.*"))  # the other tracker went on


def test_a_student_is_tracked_as_distill_says_never_as_its_teacher_was(tmp_path):
    """A teacher's stored logger (here csv; a tracking URI would be a server) is not the student's: only the distill
    command line chooses the student's trackers."""
    from diffcli.distill import run_distill
    from diffcli.loading import load_model

    run_train(compose_config("train", ["data=eight_gaussians", "model=flow", "net=oracle", "device=cpu",
                                       "logger=csv"]), tmp_path / "teacher")
    assert load_model(str(tmp_path / "teacher"), "cpu").config.logger.csv is not None  # stored with the teacher
    common = [f"teacher={tmp_path / 'teacher'}", "net=mlp", "method=reflow", "sampler=euler", "steps=8",
              "reflow.n=200", "reflow.part_size=100", "train.steps=10", "train.log_every=5", "train.sample_every=0",
              "train.eval_every=0", "train.batch_size=64", "device=cpu"]
    quiet = run_distill(compose_config("distill", common), tmp_path / "quiet")
    assert quiet["config"].logger.csv is None and not (tmp_path / "quiet" / "metrics.csv").exists()
    run_distill(compose_config("distill", [*common, "logger=csv"]), tmp_path / "tracked")
    with open(tmp_path / "tracked" / "metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [5, 10]
