"""The package as a user gets it: the wheel builds, holds what the code needs at run time (the kernels, the shipped
winners, py.typed, the LICENSE), installs into a fresh venv, and there `tunebench --version` works and `tunebench
check` passes under the Triton interpreter. torch, triton and the other dependencies are reused from this
interpreter's site-packages (a .pth file), so the test stays fast and offline."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "tunebench", "kernels", "reference")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _build_wheel(dist: Path) -> Path:
    """Built from a copy of the package's sources, so that setuptools' build/ and egg-info (and any stale file in
    them) stay out of the working tree."""
    src = dist.parent / "src"
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.db-*"))
        else:
            shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src]
    try:
        import setuptools
        if int(setuptools.__version__.split(".")[0]) >= 77:      # pyproject's build requirement: build offline
            cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    _run(cmd)
    [wheel] = dist.glob("tunebench-*.whl")
    return wheel


def _fresh_venv(path: Path, wheel: Path) -> Path:
    """A venv with the wheel installed, then this interpreter's site-packages appended to its path (after the install,
    so that pip never sees, nor touches, the tunebench installed here)."""
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_reuse_ci_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


@pytest.mark.interpreter
def test_the_wheel_installs_in_a_fresh_venv_and_checks_a_kernel(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("tunebench/py.typed", "tunebench/results.db", "tunebench/kernels/flash_v2.py",
                   "tunebench/reference/attention.py", "tunebench/commands/check.py"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: hypothesis" in metadata

    bin_ = _fresh_venv(tmp_path / "venv", wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TUNEBENCH_DB")}
    env.update(TRITON_INTERPRET="1", HOME=str(tmp_path))
    where = _run([bin_ / "python", "-c", "import tunebench, tunebench.kernels.flash_v2 as k; "
                  "print(tunebench.__file__); print(k.__file__)"], cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(str(tmp_path / "venv")) for p in where), where     # the wheel's copy, not this one
    out = _run([bin_ / "tunebench", "--version"], cwd=tmp_path, env=env).stdout
    assert out.startswith(f"tunebench {version('tunebench')} (torch {version('torch')}")
    check = _run([bin_ / "tunebench", "check", "--kernel", "flash_v2", "--profile", "cpu", "--examples", "2"],
                 cwd=tmp_path, env=env)
    assert "flash_v2" in check.stdout and "Triton interpreter" in check.stdout and "FAIL" not in check.stdout
