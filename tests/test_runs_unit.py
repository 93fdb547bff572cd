"""diffcli.runs in-process: run folders, the run lock, the stop signals and the .jsonl logs.

tests/test_hardening.py and tests/test_train.py check the same promises through real `diffcli train` runs
(two runs started in one second, a busy folder, a failed start, Ctrl-C, a torn log line); these check the
functions behind them in milliseconds.
"""

import fcntl
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

import pytest

from diffcli import DiffcliError, runs


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch, tmp_path):
    """Each test starts as a new process would: nothing claimed or created yet, working in its own folder."""
    monkeypatch.setattr(runs, "_CLAIMED", {})
    monkeypatch.setattr(runs, "CREATED", {})
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------------ new_dir


def test_new_dir_makes_the_folder_and_its_parents():
    assert runs.new_dir("outputs/train/run") == "outputs/train/run"
    assert os.path.isdir("outputs/train/run")
    assert runs.CREATED == {os.path.abspath("outputs/train/run"): [os.path.abspath("outputs/train"),
                                                                 os.path.abspath("outputs")]}


def test_new_dir_numbers_a_name_that_is_taken(monkeypatch):
    """The same name in three fresh processes: path, path_1, path_2; an existing folder is never reused."""
    made = []
    for _ in range(3):
        monkeypatch.setattr(runs, "_CLAIMED", {})
        made.append(runs.new_dir("out/run"))
    assert made == ["out/run", "out/run_1", "out/run_2"]
    assert sorted(os.listdir("out")) == ["run", "run_1", "run_2"]
    assert runs.CREATED[os.path.abspath("out/run_1")] == [] and runs.CREATED[os.path.abspath("out/run_2")] == []


def test_new_dir_is_memoized_within_a_process():
    """Hydra resolves the run folder more than once: the same name gives the same folder, no second one."""
    os.mkdir("run")
    assert runs.new_dir("run") == runs.new_dir("run") == "run_1"
    assert sorted(os.listdir(".")) == ["run", "run_1"]


def test_new_dir_in_the_working_folder_records_no_parent():
    assert runs.new_dir("run") == "run" and runs.CREATED == {os.path.abspath("run"): []}


def test_missing_folders_are_the_path_and_its_missing_parents_deepest_first(tmp_path):
    os.mkdir("a")
    assert runs.missing_folders("a/b/c") == [str(tmp_path / "a" / "b" / "c"), str(tmp_path / "a" / "b")]
    assert runs.missing_folders("a") == []
    assert runs.missing_folders(str(tmp_path / "x")) == [str(tmp_path / "x")]


# ------------------------------------------------------------------------------------------------ remove_if_unused


def _started_run(path="outputs/train/run"):
    """A folder as Hydra leaves it when the job fails at once: .hydra/, the job's log and the run lock."""
    run = runs.new_dir(path)
    os.makedirs(f"{run}/.hydra")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", ".diffcli.lock"):
        with open(f"{run}/{name}", "w") as fh:
            fh.write("x")
    return run


def test_an_unused_run_folder_and_its_created_parents_are_removed():
    _started_run()
    runs.remove_if_unused("outputs/train/run")
    assert os.listdir(".") == []
    assert runs.CREATED == {}


@pytest.mark.parametrize("name", ["log.jsonl", "checkpoints/state_2.safetensors", "samples.png", ".hydra2/x",
                                  "sub/train.log"])
def test_a_run_folder_holding_anything_of_its_own_is_kept(name):
    run = _started_run()
    os.makedirs(os.path.dirname(f"{run}/{name}"), exist_ok=True)
    open(f"{run}/{name}", "w").close()
    runs.remove_if_unused(run)
    assert os.path.isfile(f"{run}/{name}") and os.path.isfile(f"{run}/train.log")


def test_a_folder_this_process_did_not_create_is_kept():
    os.makedirs("mine/.hydra")
    open("mine/train.log", "w").close()
    runs.remove_if_unused("mine")
    assert sorted(os.listdir("mine")) == [".hydra", "train.log"]


def test_a_parent_that_holds_another_run_is_kept():
    """The parents made for a run are removed only while empty: another run's folder there stays."""
    _started_run("outputs/train/run")
    os.makedirs("outputs/train/other")
    runs.remove_if_unused("outputs/train/run")
    assert sorted(os.listdir("outputs/train")) == ["other"]


def test_a_parent_that_existed_before_is_kept():
    os.mkdir("outputs")
    _started_run("outputs/run")
    runs.remove_if_unused("outputs/run")
    assert os.listdir(".") == ["outputs"] and os.listdir("outputs") == []


def test_a_run_folder_gone_already_is_no_error():
    run = _started_run("run")
    os.rename(run, "elsewhere")
    runs.remove_if_unused(run)
    assert os.path.isdir("elsewhere")


# ------------------------------------------------------------------------------------------------ run lock


@pytest.fixture
def release():
    claimed = []
    yield claimed.append
    for folder in claimed:
        runs.release_run_dir(folder)


def test_a_second_claim_of_a_claimed_folder_is_refused(tmp_path, release):
    """Within one process a second open file is a second lock holder, as another process is."""
    folder = tmp_path / "run"
    runs.claim_run_dir(folder)
    release(folder)
    assert (folder / ".diffcli.lock").is_file()
    with pytest.raises(DiffcliError) as info:
        runs.claim_run_dir(folder)
    assert str(info.value) == (f"another diffcli train is writing into {folder}; wait for it to finish or give another "
                               "folder (hydra.run.dir=...)")


def test_a_folder_locked_by_another_holder_is_refused_until_it_lets_go(tmp_path, release):
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".diffcli.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running diffcli train holds it
        with pytest.raises(DiffcliError, match="another diffcli train is writing into"):
            runs.claim_run_dir(folder)
    runs.claim_run_dir(folder)  # the other holder closed its file: the lock is free
    release(folder)


def test_the_lock_is_held_until_released(tmp_path):
    folder = tmp_path / "run"
    runs.claim_run_dir(folder)
    with open(folder / ".diffcli.lock", "a+") as probe:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        runs.release_run_dir(folder)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
    runs.release_run_dir(folder)  # releasing twice is no error


def _claim_in_child(folder, queue):
    try:
        runs.claim_run_dir(folder)
        queue.put("claimed")
    except DiffcliError as e:
        queue.put(str(e))


def test_another_process_cannot_claim_a_claimed_folder(tmp_path, release):
    folder = tmp_path / "run"
    runs.claim_run_dir(folder)
    release(folder)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_claim_in_child, args=(folder, queue))
    child.start()
    child.join(10)
    if child.is_alive():
        child.kill()
    assert queue.get(timeout=1).startswith(f"another diffcli train is writing into {folder}")


def test_claim_makes_missing_folders(tmp_path, release):
    folder = tmp_path / "a" / "b"
    runs.claim_run_dir(folder)
    release(folder)
    assert (folder / ".diffcli.lock").is_file()


# ------------------------------------------------------------------------------------------------ StopFlag


def _wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_signal_sets_the_flag_and_restore_puts_the_previous_handler_back():
    """SIGINT and SIGTERM set .signum (no KeyboardInterrupt); restore() reinstates the handlers found."""
    seen = []
    guard = lambda signum, frame: seen.append(signum)  # noqa: E731  (catches a signal StopFlag let through)
    old = {s: signal.signal(s, guard) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            flag = runs.StopFlag()
            assert flag.signum is None
            os.kill(os.getpid(), signum)
            _wait_for(lambda: flag.signum is not None or seen)  # Python runs the handler between bytecodes
            assert flag.signum == signum and seen == []
            flag.restore()
            assert signal.getsignal(signal.SIGINT) is guard and signal.getsignal(signal.SIGTERM) is guard
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_stop_flag_outside_the_main_thread_leaves_the_handlers_alone():
    before = signal.getsignal(signal.SIGINT)
    made = []
    thread = threading.Thread(target=lambda: made.append(runs.StopFlag()))
    thread.start()
    thread.join()
    assert made[0].previous == {} and made[0].signum is None
    made[0].restore()
    assert signal.getsignal(signal.SIGINT) is before


def _two_signals():
    flag = runs.StopFlag()
    os.kill(os.getpid(), signal.SIGINT)
    _wait_for(lambda: flag.signum is not None)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    os._exit(0)  # not reached: the second signal exits at once


def test_a_second_signal_exits_at_once_with_128_plus_signum():
    child = multiprocessing.get_context("fork").Process(target=_two_signals)
    child.start()
    child.join(10)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 128 + signal.SIGINT


# ------------------------------------------------------------------------------------------------ logs

ROWS = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)]


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_truncate_keeps_the_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    _write(log, ROWS, tail='{"step": 8, "lo')
    runs.truncate(log, 4)
    assert log.read_text() == "".join(json.dumps(r) + "\n" for r in ROWS[:2])


def test_truncate_at_the_last_step_only_drops_the_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    _write(log, ROWS, tail='{"step": 8')
    runs.truncate(log, 6)
    assert runs.read_jsonl(log) == ROWS and log.read_text().endswith("}\n")


def test_truncate_of_a_missing_log_makes_no_file(tmp_path):
    runs.truncate(tmp_path / "eval.jsonl", 4)
    assert not (tmp_path / "eval.jsonl").exists()


def test_read_jsonl_skips_what_is_not_a_row(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps(ROWS[0]), '{"step": 3, "lo', "", "[1, 2]", '{"loss": 1.0}', '{"step": "5"}', "not json",
             json.dumps(ROWS[1])]
    log.write_text("\n".join(lines) + "\n")
    assert runs.read_jsonl(log) == ROWS[:2]
    assert runs.read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_skips_bytes_that_are_not_text_and_lines_nested_past_the_parser(tmp_path):
    """A log that is not UTF-8 (a disk error, a received file) or holds a line nested 100,000 deep was a
    UnicodeDecodeError / RecursionError traceback on resume; those lines are skipped like a torn one."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\x00garbage\n" + b"[" * 100_000 + b"]" * 100_000
                    + b"\n" + json.dumps(ROWS[1]).encode() + b"\n")
    assert runs.read_jsonl(log) == ROWS[:2]
    runs.truncate(log, 10)  # rewritten through a temporary: the bad lines are gone, nothing else left behind
    assert runs.read_jsonl(log) == ROWS[:2] and [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def test_a_log_rewritten_on_resume_replaces_a_symlink_not_its_target(tmp_path):
    target, log = tmp_path / "elsewhere.txt", tmp_path / "log.jsonl"
    target.write_text(json.dumps(ROWS[0]) + "\n")
    log.symlink_to(target)
    runs.truncate(log, 10)
    assert not log.is_symlink() and target.read_text() == json.dumps(ROWS[0]) + "\n"


def test_logger_drops_rows_after_the_resumed_step_and_appends(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal: plain log lines instead of a progress bar
    _write(tmp_path / "log.jsonl", ROWS, tail='{"step": 8')
    _write(tmp_path / "eval.jsonl", [{"step": 2, "fid": 3.0}, {"step": 6, "fid": 2.0}])
    logger = runs.Logger(tmp_path, total=10, start=4)
    assert runs.read_jsonl(tmp_path / "eval.jsonl") == [{"step": 2, "fid": 3.0}]
    with caplog.at_level(logging.INFO, logger="diffcli"):
        logger({"step": 6, "loss": None, "lr": 1e-3, "it_per_s": 12.0, "grad_norm": 0.5, "skipped": 2})
        logger.metrics(6, {"sliced_wasserstein": 0.25, "modes": "8/8"})
        logger.tick()
    logger.close()
    assert [r["step"] for r in runs.read_jsonl(tmp_path / "log.jsonl")] == [2, 4, 6]
    assert runs.read_jsonl(tmp_path / "log.jsonl")[-1]["loss"] is None
    assert runs.read_jsonl(tmp_path / "eval.jsonl")[-1] == {"step": 6, "sliced_wasserstein": 0.25, "modes": "8/8"}
    assert "step 6  loss n/a (every step skipped)  lr 1.00e-03  12.0 it/s  grad 0.500" in caplog.text
    assert "eval at step 6: sliced_wasserstein 0.25" in caplog.text
