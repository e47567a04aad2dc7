"""The run folder: one owner of every file name, its lock, and renamed configuration keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sims_lens.cli import main
from sims_lens.config import SimsConfig, load_config
from sims_lens.groups import chunked, regroup
from sims_lens.run_folder import RunFolder, RunFolderError, open_run


def _write_lock(folder: RunFolder, pid: int) -> None:
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.lock_path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_held_while_writing_and_released_after(tmp_path: Path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        holder = json.loads(folder.lock_path.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunFolderError, match=r"being written by another process \(pid \d+"), folder.lock():
            pass
    assert not folder.lock_path.exists()


def test_lock_is_released_on_error(tmp_path: Path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(KeyError), folder.lock():
        raise KeyError("boom")
    assert not folder.lock_path.exists()


def test_a_live_holder_is_refused(tmp_path: Path):
    folder = RunFolder(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(folder, sleeper.pid)
        with pytest.raises(RunFolderError, match=f"pid {sleeper.pid}"), folder.lock():
            pass
        assert json.loads(folder.lock_path.read_text())["pid"] == sleeper.pid  # not taken
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path: Path, capsys):
    folder = RunFolder(tmp_path / "run")
    dead = _dead_pid()
    _write_lock(folder, dead)
    with folder.lock():
        assert json.loads(folder.lock_path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock of {folder.path} from pid {dead}" in err and len(err.strip().splitlines()) == 1


def test_cli_resume_of_a_run_another_process_writes_is_refused_before_loading(tmp_path: Path, capsys):
    out = tmp_path / "run"
    open_run(out, SimsConfig(), resume=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(RunFolder(out), sleeper.pid)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "being written by another process" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_a_new_run_folder_holding_only_a_stale_lock_counts_as_empty(tmp_path: Path):
    folder = RunFolder(tmp_path / "run")
    _write_lock(folder, _dead_pid())
    with folder.lock():
        folder, config, done = open_run(folder.path, SimsConfig(), resume=False)
    assert done == 0 and folder.read_config() == config


def test_every_file_of_a_run_is_named_by_the_run_folder(tmp_path: Path):
    folder = RunFolder(tmp_path)
    names = {
        folder.config_path.name,
        folder.state_path.name,
        folder.samples_path.name,
        folder.metrics_path.name,
        folder.analysis_metrics_path.name,
        folder.base_path.name,
        folder.figures_dir.name,
    }
    assert names == {
        "config.toml",
        "state.json",
        "samples.jsonl",
        "metrics.csv",
        "analysis_metrics.csv",
        "heldout_base.jsonl",
        "figures",
    }
    assert folder.steering_path(3) == tmp_path / "steering" / "iter_003.safetensors"
    assert folder.steering_path(3, "fit") == tmp_path / "steering" / "fit_003.safetensors"


def test_config_round_trips_through_toml(tmp_path: Path):
    config = load_config(None, ['oracle="composite"', "oracles.composite.components={lexicon_sentiment=2.0}"])
    folder, _, _ = open_run(tmp_path / "run", config, resume=False)
    assert folder.read_config() == config


def test_renamed_keys_keep_working_with_a_one_line_note(capsys):
    config = load_config(None, ['aggregation="last"'])
    assert config.reduction == "last"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: configuration key aggregation is now called reduction; please rename it"]
    with pytest.raises(ValueError, match="both set"):
        load_config(None, ['aggregation="last"', 'reduction="mean"'])


def test_groups_split_and_rejoin():
    assert chunked([1, 2, 3, 4, 5, 6], 3) == [[1, 2, 3], [4, 5, 6]]
    assert regroup([1, 2, 3], [["a"], ["b", "c"]]) == [[1], [2, 3]]
    with pytest.raises(ValueError, match="groups of 4"):
        chunked([1, 2, 3], 4)
    with pytest.raises(ValueError, match="sizes"):
        regroup([1, 2], [["a"]])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_lock_of_an_exited_but_unreaped_process_counts_as_stale(tmp_path: Path):
    import time

    folder = RunFolder(tmp_path / "run")
    child = subprocess.Popen(["true"])  # exits at once; not waited for, so it stays a zombie
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _write_lock(folder, child.pid)
        assert folder.live_holder() is None  # os.kill(pid, 0) still succeeds on a zombie
    finally:
        child.wait()


def test_a_lock_of_another_host_is_dropped_only_when_that_host_is_not_known_alive(tmp_path: Path, capsys):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.lock_path.write_text(json.dumps({"pid": 12, "host": "node-7"}))
    assert not folder.drop_lock_of_other_host(unless={"node-7"}) and folder.lock_path.exists()
    assert folder.drop_lock_of_other_host(unless={"node-8"}) and not folder.lock_path.exists()
    assert "taking over the lock" in capsys.readouterr().err
    _write_lock(folder, os.getpid())  # this host: the pid decides, never this method
    assert not folder.drop_lock_of_other_host() and folder.lock_path.exists()


def test_truncation_drops_a_torn_metrics_line_and_keeps_the_file_mode(tmp_path: Path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    whole = "iteration,split,metric,layer,value\r\n0,heldout,reward_mean,,0.5\r\n1,heldout,reward_mean,,0.6\r\n"
    folder.metrics_path.write_text(whole + "1", newline="")  # a kill tore "12,heldout,..." after its first digit
    folder.truncate_after(11)
    assert folder.metrics_path.read_bytes() == whole.encode()
    mask = os.umask(0o022)
    os.umask(mask)
    assert folder.metrics_path.stat().st_mode & 0o777 == 0o666 & ~mask
