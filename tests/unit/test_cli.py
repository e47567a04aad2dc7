"""The command line: help, and one clear error line with exit status 2 for bad input."""

from __future__ import annotations

import pytest

from sims_lens.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "run", "demo", "steer-demo"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "iterations=0"], "iterations = 0 is not allowed"),
        (["--set", "update=sideways"], "update = 'sideways' is not allowed; use one of"),
        (["--set", "colour=blue"], "unknown configuration key 'colour'"),
        (["--set", "layers=top:zero"], "layers = 'top:zero'"),
        (["--config", "missing.toml"], "config file missing.toml does not exist"),
        (["--set", "positions=late"], "position policy"),
    ],
)
def test_bad_configuration_is_one_clear_error(tmp_path, capsys, argv, message):
    code = main(["run", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_malformed_toml_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("iterations = = 3\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_existing_run_folder_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("iterations = 1\n")
    assert main(["run", "--out", str(out), "--set", "iterations=1"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no config.toml" in capsys.readouterr().err


def test_a_bad_learner_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--set", 'learner="bogus"']) == 2
    assert "bogus" in capsys.readouterr().err
    assert not out.exists()


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["run", "--out", str(target), "--set", "iterations=1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_seeds_parse_lists_and_ranges():
    from sims_lens.cli_run import parse_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds(None) == []
    for bad in ("a", "1,1", "2-x"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["eval", "{tmp}/nothing", "--out", "{tmp}/e"],
            "is not a run folder (no config.toml) and holds no seed_* runs",
        ),
        (["run", "--out", "{tmp}/r", "--seeds", "0,0"], "lists a seed twice"),
    ],
)
def test_eval_and_seeds_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--set", "device=cuda"],
        ["run", "--device", "cuda:0"],
        ["demo", "--device", "cuda"],
    ],
)
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, argv):
    out = tmp_path / "run"
    assert main([*argv[:1], "--out", str(out), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: device 'cuda") and "CUDA is not available" in err[0]
    assert not out.exists()  # refused before the run folder is made


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_unknown_device_names_the_forms(tmp_path, capsys, device):
    assert main(["run", "--out", str(tmp_path / "r"), "--device", device]) == 2
    assert "cuda:N" in capsys.readouterr().err


def test_eval_multipliers_are_parsed_and_bad_ones_refused(tmp_path, capsys):
    from sims_lens.cli_run import parse_multipliers

    assert parse_multipliers("0.5,1.5, 2") == (0.5, 1.5, 2.0) and parse_multipliers(None) == ()
    for bad in ("1.5,x", "0", "-1", "nan", ","):
        with pytest.raises(ValueError, match="--multipliers"):
            parse_multipliers(bad)
    assert main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--multipliers", "a"]) == 2
    assert "--multipliers 'a'" in capsys.readouterr().err
