"""A wheel carries the recipes, and an installed (not cloned) copy finds them: `pip install qilin-lite` users get
the demo and the paper's recipes without the repository."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_an_install_finds_them(tmp_path):
    # build without isolation when setuptools is here (no download); else pip fetches it from the index
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    # from a copy: an in-tree build leaves build/, whose stale files a later wheel would ship
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                              "__pycache__", "runs", "demo-out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(src), "-w",
                        str(tmp_path / "dist")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("qilin_lite-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"qilin_lite/recipes/{p.relative_to(ROOT / 'recipes').as_posix()}"
               for p in (ROOT / "recipes").rglob("*") if p.suffix in (".yaml", ".json")}
    assert shipped and shipped <= names, sorted(shipped - names)

    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = ("import qilin_lite.config as c\n"
             "r = c.load_recipe('demo/align.yaml')\n"
             "print(c.REPO_RECIPES)\n"
             "print(c.deepspeed_path(c.load_recipe('qilin-med-vl/tune-full.yaml').train.deepspeed))\n")
    # run from elsewhere, with only the installed copy on the path (the clone's qilin_lite must not be found)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recipes, zero3 = r.stdout.split()
    assert Path(recipes) == tmp_path / "site" / "qilin_lite" / "recipes"
    assert Path(zero3).is_file() and Path(zero3).is_relative_to(tmp_path / "site")
