"""A non-editable install carries what the CLI needs: the wheel holds every package and the shipped configs, and the
installed code finds a config by name from a directory outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "nemojax", "pallas_kernels", "configs"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the wheel from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp / "dist"), str(source)], check=True, timeout=300)
    (built,) = (tmp / "dist").glob("nemojax-*.whl")
    return built


def test_wheel_holds_every_package_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".py", ".md"))
    assert configs and {f"nemojax/configs/{name}" for name in configs} <= names
    packages = sorted(p.relative_to(ROOT).as_posix() for top in ("nemojax", "pallas_kernels")
                      for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts)
    assert packages and set(packages) <= names
    assert not any(name.startswith(("tests/", "configs/", "experiments/")) for name in names)


def test_installed_layout_finds_configs_by_name_outside_the_checkout(wheel, tmp_path):
    """Unpacks the wheel (the layout pip installs) and resolves configs from an empty working directory."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # config_files imports only ml_collections; loading it by path keeps nemojax/__init__ (JAX) out of the check.
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('cf', {str(site / 'nemojax' / 'config_files.py')!r})\n"
        "cf = importlib.util.module_from_spec(spec); spec.loader.exec_module(cf)\n"
        "print(cf.packaged_dir())\n"
        "for name in ('tiny', 'configs/tiny.py', 'small_hybrid'):\n"
        "    print(cf.resolve(name))\n"
        "print(cf.load('tiny', ['train.steps=3']).train.steps)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    shipped = site / "nemojax" / "configs"
    assert out == [str(shipped), str(shipped / "tiny.py"), str(shipped / "tiny.py"), str(shipped / "small_hybrid.py"),
                   "3"]
