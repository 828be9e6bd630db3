"""The wheel: one top-level package, the data and configs inside it, usable outside the checkout.

The wheel is built from this checkout and installed into a new virtualenv in a temporary
folder, which is also the working directory of every command run there, so nothing of
the checkout is on its path. The virtualenv borrows the dependencies already installed in
this environment (one ``.pth`` line) instead of downloading them again; it checks that
each dependency the wheel declares is installed at a version the wheel admits.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
                    str(REPO)], check=True, capture_output=True, text=True, cwd=out)
    (built,) = out.glob("tuneloop-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv outside the checkout with the wheel installed; returns its python."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root / "env")], check=True, cwd=root)
    python = root / "env" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True).stdout
    # Only the directory is added: .pth files in it (this environment's editable install of
    # the checkout among them) are not processed, so `tuneloop` can only come from the wheel.
    Path(purelib.strip(), "borrowed-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    # The borrowed packages include this checkout's editable install: pip must not take it
    # for the wheel's distribution (nor touch it), hence --ignore-installed.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)],
                   check=True, cwd=root)
    return python


def _run(python: Path, code: str) -> str:
    home = python.parents[2]
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=home,
                          env={"PATH": str(python.parent), "HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_wheel_holds_one_top_level_package_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"tuneloop"}
    for needed in ("tuneloop/data/banking77/train.csv", "tuneloop/data/banking77/test.csv",
                   "tuneloop/data/banking77/categories.json", "tuneloop/data/banking77/LICENSE",
                   "tuneloop/data/snips/train.csv", "tuneloop/data/snips/schema.json",
                   "tuneloop/data/snips/LICENSE", "tuneloop/data/sgd/test.csv",
                   "tuneloop/data/sgd/LICENSE", "tuneloop/data/sgd/SOURCE.md",
                   "tuneloop/training/configs/smollm2_lora.yaml",
                   "tuneloop/training/configs/demo.yaml",
                   "tuneloop/services/feedback/schemas/feedback.v1.json"):
        assert needed in names, needed
    assert not any(n.startswith("tuneloop/") and "/tests/" in n for n in names)


def test_installed_outside_the_checkout_it_runs_and_loads_its_data(venv: Path) -> None:
    out = _run(venv, """
import importlib.metadata as md, importlib.util, json
from packaging.requirements import Requirement
import tuneloop
from tuneloop.services.demo import banking77
from tuneloop.services.demo.task_data import bundled, load_rows
from tuneloop.training.config import CONFIGS_DIR, RecipeConfig
from tuneloop.services.feedback.contract import SCHEMA_FILE

missing = []
for line in md.requires("tuneloop") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        installed = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req)); continue
    if not req.specifier.contains(installed, prereleases=True):
        missing.append(f"{req} (installed {installed})")
print(json.dumps({
    "package": tuneloop.__file__,
    "services": importlib.util.find_spec("services") is not None,
    "bench": importlib.util.find_spec("bench") is not None,
    "train": len(banking77.load("train")), "test": len(banking77.load("test")),
    "intents": len(banking77.intents()),
    "data": str(banking77.data_dir()),
    "tasks": {name: [len(load_rows(bundled(name), s)) for s in ("train", "test")]
              for name in ("snips", "sgd")},
    "configs": {p.name: RecipeConfig.from_file(p).fingerprint() for p in sorted(CONFIGS_DIR.glob("*.yaml"))},
    "schema": json.loads(SCHEMA_FILE.read_text())["title"] if SCHEMA_FILE.exists() else None,
    "missing": missing,
}))
""")
    import json

    found = json.loads(out.strip().splitlines()[-1])
    assert "site-packages" in found["package"] and str(REPO) not in found["package"]
    assert str(REPO) not in found["data"]
    assert found["services"] is False and found["bench"] is False  # nothing else is top level
    assert (found["train"], found["test"], found["intents"]) == (10003, 3080, 77)
    # One SGD test row has an empty reply: the loader leaves it out.
    assert found["tasks"] == {"snips": [13784, 700], "sgd": [30000, 5999]}
    assert set(found["configs"]) == {"demo.yaml", "gpu_bf16.yaml", "smollm2_lora.yaml"}
    assert found["schema"]
    assert found["missing"] == []
    help_text = subprocess.run([str(venv.parent / "tuneloop"), "--help"], capture_output=True,
                               text=True, cwd=venv.parents[2], env={"PATH": str(venv.parent)})
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    for command in ("up", "status", "demo", "bench", "canary", "adapters"):
        assert command in help_text.stdout
