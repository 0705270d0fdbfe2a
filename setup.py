"""Build glue for the native extension ``fmrt._C``; all metadata lives in pyproject.toml.

``build_ext`` runs CMake (CMakeLists.txt). The CMake build tree is kept under ``build/`` so
rebuilds (including ``pip install -e .``) are incremental. Environment knobs:
  FMRT_BUILD_CUDA=1   also compile csrc/cuda (needs nvcc; off by default)
  FMRT_DEBUG=1        Debug build
  FMRT_SKIP_NATIVE=1  skip the extension entirely (fmrt falls back to torch/numpy)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "on", "true", "yes"}


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        # Listing the sources (relative paths) puts them into sdists; CMake does the build.
        sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
                         if p.suffix in {".cpp", ".cu"})
        depends = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
                         if p.suffix in {".h", ".inc", ".cuh"})
        super().__init__(name, sources=sources, depends=depends + ["CMakeLists.txt"])
        self.sourcedir = sourcedir


def _cmake() -> str:
    try:  # the `cmake` wheel (a build requirement) is preferred over whatever is on PATH
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if not exe:
        raise RuntimeError("cmake is required to build fmrt._C (pip install cmake)")
    return exe


def _pybind11_cmakedir() -> str:
    return subprocess.check_output([sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()


class CMakeBuild(build_ext):
    def run(self) -> None:
        if _truthy("FMRT_SKIP_NATIVE"):
            print("FMRT_SKIP_NATIVE set: not building fmrt._C")
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cfg = "Debug" if (self.debug or _truthy("FMRT_DEBUG")) else "Release"
        cuda = _truthy("FMRT_BUILD_CUDA")
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{cfg.lower()}" + ("-cuda" if cuda else "")
        build_dir = ROOT / "build" / f"cmake-{tag}"
        out_dir = build_dir / "out"
        cmake = _cmake()

        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmakedir()}",
            f"-DFMRT_VERSION={self.distribution.get_version()}",
            f"-DFMRT_BUILD_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if "CMAKE_GENERATOR" not in os.environ and not (build_dir / "CMakeCache.txt").exists():
            ninja = shutil.which("ninja", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
            if ninja:
                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, "-S", str(ext.sourcedir), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)

        built = out_dir / Path(self.get_ext_filename(ext.name)).name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)


setup(
    ext_modules=[CMakeExtension("fmrt._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
