"""What an application service installs: one package, ``genline``, that never shadows its own
``config`` or ``tasks``, and a public API at the top (``from genline import Genline, UserError``).

The wheel is built from a copy of the source tree without build isolation (nothing is downloaded)
and installed into a fresh virtual environment; genline's dependencies come from the test run's own
environment through a path entry, so the test needs no network either.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
import uuid
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("cli", "config", "pipelines", "provider", "storage", "tasks", "workers")
SKIP = shutil.ignore_patterns(".venv", ".git", "var", "build", "__pycache__", "*.egg-info", ".*_cache", "tests", "lab")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "genline"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("genline-*.whl")
    return built


def test_the_wheel_installs_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"genline", next(t for t in tops if t.endswith(".dist-info"))}
    assert len(tops) == 2


def test_the_wheel_carries_every_module_and_data_file_of_the_package_folders(wheel: Path) -> None:
    """A module or a data file in one of the folders that is missing from the wheel would only show
    up on a user's machine; the benchmark and the chaos run (lab/) stay out."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for folder in PACKAGE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"genline/{path.relative_to(ROOT).as_posix()}" in names, path
    assert not any(name.startswith(("lab/", "tests/", "genline/lab/")) for name in names)
    assert "genline/config/catalog.json" in names
    assert "genline/storage/migrations/env.py" in names


def _fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies, from this test run's environment. A path entry only: the .pth files there
    # (genline's own editable finder among them) are not run, so only the wheel can provide genline.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "genline_test_deps.pth").write_text("\n".join(deps) + "\n")
    return python


def test_a_service_with_its_own_config_and_tasks_packages_submits_through_the_installed_wheel(
    wheel: Path, tmp_path: Path
) -> None:
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    app = tmp_path / "service"
    for name in ("config", "tasks"):
        (app / name).mkdir(parents=True)
        (app / name / "__init__.py").write_text(f"OWNER = 'the service: {name}'\n")
    script = """
import json, config, tasks
from genline import Genline, UserError
import genline
from genline.storage.migrate import upgrade
from genline.config.settings import load_settings

upgrade(load_settings().database_url)
with Genline() as g:
    accepted = g.submit({
        "user_id": "seller-42", "feature": "listing-video",
        "description": "Hand-thrown stoneware mug, speckled glaze, 350 ml.",
        "image": "https://cdn.example.com/mug.jpg", "idempotency_key": "listing-1",
    })
    status = g.status(accepted.pipeline_id)["status"]
    try:
        g.submit({"user_id": "seller-42"})
        refused = None
    except UserError as err:
        refused = err.code
print(json.dumps({
    "config": config.OWNER, "tasks": tasks.OWNER, "genline": genline.__file__,
    "pipeline_id": accepted.pipeline_id, "created": accepted.created, "status": status, "refused": refused,
}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLINE_", "APIMART_", "PYTHON"))}
    env.update({"GENLINE_VAR_DIR": str(tmp_path / "state"), "APIMART_API_KEY": "test-key-" + uuid.uuid4().hex})
    done = subprocess.run(
        [str(python), "-c", script], cwd=app, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["config"] == "the service: config" and seen["tasks"] == "the service: tasks"
    assert Path(seen["genline"]).is_relative_to(tmp_path / "venv")  # the wheel's, not the source tree's
    assert seen["pipeline_id"].startswith("pl_") and seen["created"] is True
    assert seen["status"] == "pending"  # accepted, its first step queued on the embedded broker
    assert seen["refused"] is not None


def test_a_new_module_in_a_package_folder_is_importable_without_reinstalling() -> None:
    """The editable install maps ``genline.pipelines`` onto the pipelines/ folder itself."""
    name = f"_probe_{uuid.uuid4().hex[:8]}"
    module = ROOT / "pipelines" / f"{name}.py"
    module.write_text("ANSWER = 42\n")
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"from genline.pipelines.{name} import ANSWER; print(ANSWER)"],
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        module.unlink()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_nothing_imports_the_folders_by_their_bare_names() -> None:
    """Installed, the folders exist only as ``genline.<folder>``: a bare ``import config`` works in
    the source tree and breaks (or finds the host application's ``config``) once installed."""
    offenders = []
    for path in [
        *ROOT.glob("genline/*.py"),
        *(p for d in (*PACKAGE_DIRS, "lab", "tests") for p in (ROOT / d).rglob("*.py")),
    ]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGE_DIRS
            ]
    assert offenders == []
