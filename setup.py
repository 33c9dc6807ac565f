"""Build of the deformux Python package (metadata lives in pyproject.toml).

`build_ext` first builds the Swift engine as a dynamic library with the Swift runtime linked in:

    swift build -c release --product DeformUXC -Xswiftc -static-stdlib -Xcc -march=native

then copies libDeformUXC.so next to the extension `deformux._C` (which finds it through the rpath
$ORIGIN), in the build directory and, for editable installs, in python/deformux/ too.

Environment:
    DEFORMUX_SWIFT_FLAGS         CPU flags for swift build (default "-Xcc -march=native"; without a CPU
                                 target Swift's SIMD code is about 100x slower). Set to "" for a
                                 generic build, e.g. a wheel for other machines.
    DEFORMUX_SWIFT_SCRATCH_PATH  passed as --scratch-path (default: SwiftPM's .build in the repo).
    DEFORMUX_SWIFT               the swift executable (default "swift" on PATH).
"""
import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBRARY = "libDeformUXC.so"
HEADER_DIR = "Sources/DeformUXC/include"
# Files shipped inside the package (package data), copied at build time from the repo so that the
# repository holds one copy of each: (source relative to ROOT, destination relative to the package).
PACKAGE_FILES = [
    ("data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
     "data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    ("data/mni152/LICENSE.md", "data/mni152/LICENSE.md"),
    ("data/mni152/nilearn-LICENSE-BSD3.txt", "data/mni152/nilearn-LICENSE-BSD3.txt"),
    ("data/mni152/README.md", "data/mni152/README.md"),
    # ---- segmentation (issue 8): the GM/WM maps and the tissue labels made from them (the reference of
    # the demo and of deformux.data.mni152(), which the training issue uses too) ----
    ("data/mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
     "data/mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    ("data/mni152/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
     "data/mni152/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
    ("data/mni152/mni152_tissue_labels.nii.gz", "data/mni152/mni152_tissue_labels.nii.gz"),
    # ---- end of segmentation ----
    (HEADER_DIR + "/deformux.h", "include/deformux.h"),
]


def swift_command(*extra):
    swift = os.environ.get("DEFORMUX_SWIFT", "swift")
    cmd = [swift, "build", "-c", "release", "--product", "DeformUXC", "-Xswiftc", "-static-stdlib"]
    cmd += shlex.split(os.environ.get("DEFORMUX_SWIFT_FLAGS", "-Xcc -march=native"))
    scratch = os.environ.get("DEFORMUX_SWIFT_SCRATCH_PATH")
    if scratch:
        cmd += ["--scratch-path", scratch]
    return cmd + list(extra)


def build_swift_library():
    """Builds libDeformUXC.so and returns the directory holding it."""
    cmd = swift_command()
    print("deformux: " + shlex.join(cmd), flush=True)
    try:
        subprocess.run(cmd, cwd=ROOT, check=True)
        out = subprocess.run(swift_command("--show-bin-path"), cwd=ROOT, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
    except FileNotFoundError as e:
        raise RuntimeError("deformux: the Swift toolchain (swift) is needed to build the engine; "
                           "install Swift 6 and put it on PATH") from e
    bin_dir = Path(out.strip().splitlines()[-1])
    if not (bin_dir / LIBRARY).is_file():
        raise RuntimeError(f"deformux: swift build succeeded but {bin_dir / LIBRARY} is missing")
    return bin_dir


class BuildExt(build_ext):
    """Builds the Swift engine, then the extension linked to it, and puts the library beside it."""

    def run(self):
        bin_dir = build_swift_library()
        self._swift_library = bin_dir / LIBRARY
        for ext in self.extensions:
            ext.library_dirs.append(str(bin_dir))
        super().run()  # builds into build_lib; copies to the source tree when inplace/editable

    def build_extension(self, ext):
        super().build_extension(ext)
        dest = Path(self.get_ext_fullpath(ext.name)).parent
        self.copy_file(str(self._swift_library), str(dest / LIBRARY))

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(str(self._swift_library), str(Path(inplace_file).parent / LIBRARY))

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [str(Path(p).parent / LIBRARY) for p in outputs if "_C" in Path(p).name]


class BuildPy(build_py):
    """Adds the bundled data and the C header to the package (not needed for editable installs,
    where deformux finds them in the repository)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        pkg = Path(self.build_lib) / "deformux"
        for src, dst in PACKAGE_FILES:
            (pkg / dst).parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(ROOT / src), str(pkg / dst))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs += [str(Path(self.build_lib) / "deformux" / dst) for _, dst in PACKAGE_FILES]
        return outputs


setup(
    ext_modules=[
        Extension(
            "deformux._C",
            sources=["python/deformux/_C.c"],
            include_dirs=[HEADER_DIR],
            libraries=["DeformUXC"],
            extra_compile_args=["-std=c11", "-Wall", "-Wextra"],
            extra_link_args=["-Wl,-rpath,$ORIGIN"],
        )
    ],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
