"""`pip install ./python` into a fresh venv (offline: Debian's setuptools and wheel, no PyPI),
then the installed package from outside the source tree: with $SPILLWAY_LIBRARY, with an
installed libspillway.so (PREFIX/lib as tools/install-c-library.sh lays it out), and with
neither (a clear error)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spillway

SOURCE = Path(__file__).resolve().parents[1]  # python/
TIMEOUT = 300  # seconds, for any one step

ROUND_TRIP = r"""
import sys, tempfile, pathlib
import numpy as np
import spillway
assert pathlib.Path(spillway.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), spillway.__file__
config = pathlib.Path(tempfile.mkdtemp()) / "spillway.toml"
config.write_text('slot-size = "4k"\nmax-page-size = "64k"\n[[tier]]\nkind = "dram"\ncapacity = "8m"\n')
geometry = spillway.KVGeometry(tokens_per_block=4, layers=2, kv_heads=2, head_dim=8, dtype_size=2)
with spillway.Store(str(config)) as store:
    pool = store.kv_pool(geometry, "installed")
    hashes = pool.block_hashes(range(12), packed=True)
    kv = np.random.default_rng(0).integers(0, 255, size=(2, 3, geometry.layer_bytes), dtype=np.uint8)
    assert pool.store_array(hashes, kv) == 3
    out = np.zeros_like(kv)
    assert pool.load_array(hashes, out) == 3 and (out == kv).all()
print("library", spillway.library_path())
print("version", spillway.version())
"""


def clean_env(**extra):
    env = {key: value for key, value in os.environ.items()
           if key not in ("SPILLWAY_LIBRARY", "SPILLWAY_PREFIX", "PYTHONPATH", "LD_LIBRARY_PATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # never reach PyPI
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(command, cwd, env):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
    """A venv (sharing the system's numpy) with ./python pip-installed into it."""
    base = tmp_path_factory.mktemp("pip-install")
    # Install from a copy so the build leaves nothing in the source tree.
    source = base / "source"
    shutil.copytree(SOURCE, source, ignore=shutil.ignore_patterns("tests", "examples", "__pycache__", "build", "*.egg-info"))
    environment = base / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(environment)], base, clean_env())
    assert made.returncode == 0, made.stderr
    python = environment / "bin" / "python"
    installed = run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
                     str(source)], base, clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = run([str(python), "-m", "pip", "show", "spillway"], base, clean_env())
    assert listed.returncode == 0 and "Version: 0.3.0" in listed.stdout, listed.stdout + listed.stderr
    return python


def test_installed_package_with_spillway_library(venv_python, tmp_path):
    library = spillway.library_path()
    result = run([str(venv_python), "-c", ROUND_TRIP], tmp_path, clean_env(SPILLWAY_LIBRARY=library))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"library {library}" in result.stdout
    assert f"version {spillway.version()}" in result.stdout


def test_installed_package_finds_an_installed_libspillway(venv_python, tmp_path):
    # What tools/install-c-library.sh PREFIX leaves: PREFIX/lib/libspillway.so.
    prefix = tmp_path / "prefix"
    (prefix / "lib").mkdir(parents=True)
    shutil.copy2(spillway.library_path(), prefix / "lib" / "libspillway.so")
    result = run([str(venv_python), "-c", ROUND_TRIP], tmp_path, clean_env(SPILLWAY_PREFIX=str(prefix)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"library {prefix / 'lib' / 'libspillway.so'}" in result.stdout


def test_installed_package_without_a_library_says_how_to_build_it(venv_python, tmp_path):
    empty = tmp_path / "empty-prefix"
    empty.mkdir()
    env = clean_env(SPILLWAY_PREFIX=str(empty))
    probe = run([str(venv_python), "-c", "import ctypes; ctypes.CDLL('libspillway.so')"], tmp_path, env)
    if probe.returncode == 0:
        pytest.skip("a libspillway.so is installed on the dynamic loader's path here")
    result = run([str(venv_python), "-c", "import spillway"], tmp_path, env)
    assert result.returncode != 0
    assert "LibraryNotFoundError" in result.stderr, result.stderr
    for words in ("SPILLWAY_LIBRARY", "swift build -c release --product SpillwayC", "tools/install-c-library.sh", str(empty)):
        assert words in result.stderr, result.stderr
    # A SPILLWAY_LIBRARY naming nothing is the same kind of error, not a bare dlopen failure.
    missing = run([str(venv_python), "-c", "import spillway"], tmp_path, clean_env(SPILLWAY_LIBRARY=str(tmp_path / "nope.so")))
    assert missing.returncode != 0 and "LibraryNotFoundError" in missing.stderr and "nope.so" in missing.stderr, missing.stderr
