"""The source distribution and setup.py as a user meets them outside the editable dev install."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")
pytestmark = pytest.mark.skipif(not os.path.exists(SETUP), reason="needs the source checkout")


def _setup_py(*args, env=None, cwd=ROOT, prelude=""):
    """python setup.py args, in cwd, after the Python statements in prelude."""
    code = (f"import sys; sys.argv = ['setup.py', *{list(args)!r}]; {prelude}"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_sdist_carries_every_file_the_build_needs(tmp_path):
    # made where the CUDA build is off: the CUDA sources and every header must still be in it
    # (without MANIFEST.in setuptools took only the extensions' listed sources)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.so", "*.egg-info",
                                                             "__pycache__", ".benchmarks", ".hypothesis"))
    out = _setup_py("-q", "sdist", "-d", str(tmp_path / "dist"), env={"RECSYS_KERNELS_CUDA": "0"}, cwd=src)
    assert out.returncode == 0, out.stderr[-2000:]
    (tarball,) = (tmp_path / "dist").iterdir()
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = [os.path.relpath(os.path.join(d, f), src) for d, _, files in os.walk(src / "csrc") for f in files]
    needed += [os.path.relpath(os.path.join(d, f), src) for d, _, files in os.walk(src / "bench") for f in files
               if f.endswith((".py", ".sh", ".c", ".cpp", ".h"))]  # the benchmarks and their C / C++ programs
    needed += ["tests/conftest.py", "tests/helpers.py", "README.md", "MANIFEST.in", "kernels/embedding_bag.py"]
    assert [f for f in needed if f not in names] == []


def test_a_build_without_torch_says_to_install_it_and_skip_isolation():
    # pip's isolated build environment has no torch (pyproject.toml asks for none)
    out = _setup_py("--name", prelude="sys.modules['torch'] = None; ")
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "install torch first" in out.stderr


def test_auto_skips_cuda_where_cuda_home_has_no_nvcc(tmp_path):
    out = _setup_py("--name", env={"RECSYS_KERNELS_CUDA": "auto", "CUDA_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"not building the CUDA extension (no nvcc in CUDA_HOME={tmp_path})" in out.stdout or \
        "torch is a CPU-only build" in out.stdout
    out = _setup_py("--name", env={"RECSYS_KERNELS_CUDA": "1", "CUDA_HOME": str(tmp_path)})
    assert out.returncode != 0 and "RECSYS_KERNELS_CUDA=1 but the CUDA extension cannot be built" in out.stderr


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """The package metadata setup.py writes (its .egg-info folder)."""
    out_dir = tmp_path_factory.mktemp("egg_info")
    out = _setup_py("-q", "egg_info", "-e", str(out_dir), env={"RECSYS_KERNELS_CUDA": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    (info,) = out_dir.glob("*.egg-info")
    return info


def test_the_package_asks_for_the_torch_it_is_built_against(egg_info):
    import torch

    requires = (egg_info / "requires.txt").read_text().split("\n[")[0].split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requires and "numpy" in requires


def test_the_metadata_version_is_the_package_version(egg_info):
    # one version, recsys_kernels.__version__, which pyproject.toml reads (it wrote its own before)
    import recsys_kernels

    metadata = (egg_info / "PKG-INFO").read_text().splitlines()
    assert f"Version: {recsys_kernels.__version__}" in metadata and "License-Expression: Apache-2.0" in metadata
