"""Type-check the TensorRT layer against tensorrt-stubs, for real.

`mypy engines/trt_build.py ...` alone passes vacuously: tensorrt-stubs installs tensorrt/*.pyi
without a py.typed marker, so mypy treats `tensorrt` as an untyped missing import (Any), and the
editable install's import hook hides elite_export.engines / elite_export.runtime from it too.
This lays out both in a temporary folder on MYPYPATH and runs mypy there. The stubs (10.13, made
by a stub generator) have a few lines mypy cannot parse (a parameter named `in`, a required
parameter after defaulted ones): the copy gets those fixed, the installed files stay as they are,
and errors inside the stubs (e.g. their `bool` constant shadowing the builtin) are not reported.
Only the given files are reported on (follow_imports = silent): the rest of the tree is others' to check.

    python scripts/typecheck_trt.py [FILE ...]   # default: the TensorRT layer; exit code = mypy's
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"engines": "engines", "runtime": "runtime", "calib": "calib"}  # elite_export.<sub> -> folder
DEFAULT_FILES = ("engines/trt_build.py", "engines/cache.py", "runtime/tensorrt_backend.py", "runtime/cuda_device.py")


def repair_stub(path: str) -> None:
    with open(path) as f:
        text = f.read()
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", text)  # `in` is a keyword
    text = re.sub(r"(def \w+\(.*= None, )(\w+: \w+)\)", r"\1\2 = ...)", text)  # required after defaulted
    with open(path, "w") as f:
        f.write(text)


def layout(tmp: str) -> str:
    """tmp/elite_export mirrors the installed package (pyproject's package-dir); tmp/tensorrt* link the stubs."""
    site = sysconfig.get_paths()["purelib"]
    for stub in ("tensorrt", "tensorrt_bindings"):
        if not os.path.isdir(os.path.join(site, stub)):
            sys.exit(f"{stub} stubs not found in {site}: pip install --no-deps tensorrt-stubs")
        shutil.copytree(os.path.join(site, stub), os.path.join(tmp, stub))
        for folder, _, names in os.walk(os.path.join(tmp, stub)):
            for name in names:
                if name.endswith(".pyi"):
                    repair_stub(os.path.join(folder, name))
    pkg = os.path.join(tmp, "elite_export")
    os.mkdir(pkg)
    for name in os.listdir(os.path.join(ROOT, "elite_export")):
        os.symlink(os.path.join(ROOT, "elite_export", name), os.path.join(pkg, name))
    for sub, folder in PACKAGE_DIRS.items():
        if os.path.isdir(os.path.join(ROOT, folder)):
            os.symlink(os.path.join(ROOT, folder), os.path.join(pkg, sub))
    return pkg


def write_config(tmp: str) -> str:
    """pyproject's [tool.mypy], plus: report on the given files only, not on the stubs."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        base = tomllib.load(f).get("tool", {}).get("mypy", {})
    lines = ["[mypy]", *(f"{k} = {v}" for k, v in base.items()), "follow_imports = silent",
             "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]", "ignore_errors = True"]
    path = os.path.join(tmp, "mypy.ini")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(files: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = layout(tmp)
        config = write_config(tmp)
        targets = [os.path.join(pkg, PACKAGE_DIRS.get(f.split("/")[0], f.split("/")[0]), *f.split("/")[1:])
                   if f.split("/")[0] in PACKAGE_DIRS else os.path.join(ROOT, f) for f in files]
        env = {**os.environ, "MYPYPATH": tmp}
        cmd = [sys.executable, "-m", "mypy", "--config-file", config,
               "--no-incremental", *targets]
        return subprocess.call(cmd, env=env, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(DEFAULT_FILES)))
