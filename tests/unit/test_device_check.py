"""scripts/device_check.py and device_wheels.py: what ``env`` installs, and the whole check at tiny sizes on the CPU."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str = "device_wheels") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_wheel(folder: Path, name: str, version: str, requires: list[str], files: dict[str, str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "\n".join([f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta + "\n\nA description.\n")
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_env_installs_only_what_is_missing_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    make_wheel(tmp_path, "alpha", "2.0", ["beta>=1", "gamma", 'delta; python_version < "3"', "wandb"], {})
    make_wheel(tmp_path, "beta", "1.5", [], {})
    make_wheel(tmp_path, "gamma", "0.9", ["beta<1.2"], {})
    installed = {"alpha": "1.0", "beta": "1.1"}
    monkeypatch.setattr(script, "installed_version", installed.get)
    chosen, rows = script.plan_install(script.read_wheels(tmp_path), ["alpha==2.0", "epsilon>=3"])
    assert sorted(w.name for w in chosen) == ["alpha", "gamma"]  # beta 1.1 already meets both requirements
    actions = {r["package"]: r["action"] for r in rows}
    assert actions == {
        "alpha": "install 2.0",
        "beta": "kept",
        "gamma": "install 0.9",
        "wandb": "skipped",  # NOT_NEEDED, with its reason
        "epsilon": "MISSING",  # neither installed nor in the folder
    }
    assert "not 1.0" in next(r["why"] for r in rows if r["package"] == "alpha")


def test_env_reports_a_requirement_the_folder_cannot_meet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    make_wheel(tmp_path, "alpha", "1.0", ["beta>=2"], {})
    make_wheel(tmp_path, "beta", "1.5", [], {})
    monkeypatch.setattr(script, "installed_version", lambda name: None)
    chosen, rows = script.plan_install(script.read_wheels(tmp_path), ["alpha"])
    assert [w.name for w in chosen] == ["alpha"]
    beta = next(r for r in rows if r["package"] == "beta")
    assert beta["action"] == "MISSING" and "has 1.5" in beta["why"]


def test_a_wheel_unpacks_into_the_site_without_pip(tmp_path: Path) -> None:
    script = load_script()
    wheel = make_wheel(
        tmp_path,
        "alpha",
        "1.0",
        [],
        {
            "alpha/__init__.py": "VALUE = 1\n",
            "alpha-1.0.data/purelib/alpha_extra.py": "EXTRA = 2\n",
            "alpha-1.0.data/scripts/alpha-cli": "#!/bin/sh\n",
        },
    )
    site = tmp_path / "site"
    script.unpack_wheel(wheel, site)
    assert (site / "alpha" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (site / "alpha_extra.py").read_text() == "EXTRA = 2\n"
    assert (site / "alpha-1.0.dist-info" / "METADATA").is_file()
    assert not (site / "alpha-cli").exists() and not (site / "alpha-1.0.data").exists()


def test_the_datasets_stand_in_imports_and_refuses_every_use(tmp_path: Path) -> None:
    script = load_script()
    script.write_datasets_stand_in(tmp_path)
    code = (
        "from datasets.arrow_dataset import Dataset\n"
        "from datasets.load import load_dataset\n"
        "import importlib.metadata as m\n"
        "try:\n    m.version('datasets'); print('metadata')\nexcept m.PackageNotFoundError:\n    print('no metadata')\n"
        "try:\n    load_dataset('x')\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        "no metadata",
        "refused: datasets is not installed on this machine (scripts/device_check.py stand-in)",
    ]


def test_the_scripts_import_only_the_standard_library_at_start() -> None:
    """``env`` runs before anything is installed: without site-packages (``-S``) both scripts still import."""
    code = "import sys; sys.path.insert(0, 'scripts'); import device_check, device_wheels; print(device_check.main)"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert callable(load_script("device_check").prepare_env)  # loaded by path, as here, it finds its sibling too


def test_env_runs_as_a_script_from_another_folder(tmp_path: Path) -> None:
    """As device_check.sh runs it: ``python scripts/device_check.py env`` finds device_wheels.py beside it."""
    script = ROOT / "scripts" / "device_check.py"
    command = [sys.executable, str(script), "env", "--wheels", str(tmp_path / "none"), "--site", str(tmp_path / "site")]
    done = subprocess.run([*command, "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "install.md").read_text().startswith("## Install (no network)")
    assert (tmp_path / "out" / "install.csv").is_file() and "tokenizer files: none carried" in done.stdout


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.integration  # random:tiny has the embedded model's tokenizer
def test_the_check_runs_every_step_at_tiny_sizes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "SIMS_LENS_WHEELS": str(tmp_path / "no-wheels"),  # this environment has everything: nothing to install
        "SIMS_LENS_DEVICE_SITE": str(tmp_path / "site"),
    }
    env.pop("SIMS_LENS_TOKENIZER", None)
    command = ["bash", str(ROOT / "scripts" / "device_check.sh"), "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    steps = ["install", "environment", "build", "iteration", "cli_run", "bench"]
    for step in steps:
        assert (out / f"{step}.csv").is_file() and (out / f"{step}.md").is_file(), step
        assert (out / f"{step}.md").read_text().startswith("## ")
    summary = (out / "summary.md").read_text()
    for step in steps[1:]:
        assert f"| {step} | ok |" in summary
    assert not list(out.glob("*.error.txt"))

    installed = rows(out / "install.csv")
    assert {r["action"] for r in installed} <= {"kept", "skipped"}  # nothing missing, nothing to install here
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())

    [build] = rows(out / "build.csv")
    assert build["model"] == "random:tiny" and build["as_documented"] == "yes"
    assert (build["layers"], build["vocab"], build["dtype"]) == ("2", "49152", "float32")
    assert build["twin_accepted"] == "yes" and float(build["largest_logit_difference"]) <= float(build["tolerance"])

    iteration = {r["item"]: r for r in rows(out / "iteration.csv")}
    total = float(iteration["iteration (step 1)"]["value"])
    phases = [float(r["value"]) for item, r in iteration.items() if item.startswith("phase ")]
    assert len(phases) == 8 and all(p >= 0 for p in phases) and sum(phases) <= total
    assert float(iteration["phase sample"]["value"]) > 0
    assert int(float(iteration["sampled response tokens"]["value"])) > 0
    assert int(float(iteration["pairs"]["value"])) >= 2
    assert float(iteration["memory peak"]["value"]) >= float(iteration["the model's weights"]["value"]) > 0

    metrics = rows(out / "cli_run.csv")
    assert {r["iteration"] for r in metrics} == {"0", "1"}  # the base model and the one iteration
    assert {r["metric"] for r in metrics} >= {"perplexity_under_base", "win_rate_vs_base"}
    assert (out / "cli-run" / "state.json").is_file() and "random:tiny" in (out / "cli-run" / "config.toml").read_text()

    [bench] = rows(out / "bench.csv")
    assert bench["benchmark"] == "steering cost" and bench["unit"] == "tokens/s" and float(bench["value"]) > 0
