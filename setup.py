"""Builds hiprune_ops._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch exist.

HIPRUNE_CUDA=0 skips the CUDA kernels, HIPRUNE_CUDA=1 requires them; TORCH_CUDA_ARCH_LIST (default "9.0")
picks the GPU architectures. HIPRUNE_NO_EXTENSION=1 installs the Python package alone (the Makefile then builds
the extension in place, incrementally). HIPRUNE_SANITIZE=1 builds the CPU kernels with AddressSanitizer and
UBSan (make sanitize).

The extension is compiled against the torch installed in this environment: install with
`pip install --no-build-isolation .` so that pip does not build it against another torch in an isolated
environment. The torch version is written beside the extension (_C.torch_version); hiprune_ops refuses to load
an extension built for another torch, naming both versions.
"""

import glob
import os
import re
import shutil
import sys
import sysconfig

# torch guesses CUDA_HOME from nvcc's folder, which is wrong when nvcc is a wrapper in /usr/local/bin.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif shutil.which("nvcc"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("HIPRUNE_CUDA", "auto").lower()
    found = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not found:
            raise RuntimeError("HIPRUNE_CUDA=1 but nvcc or a CUDA build of torch is missing")
        return True
    return found


def cuda_include_dirs() -> list:
    # torch's CUDA headers include cusparse.h and friends, which pip installs under nvidia/cu*/include.
    # They sit beside torch, which may live in another environment than this one (a .pth file pointing there).
    dirs = []
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(torch.__file__))]):
        nvidia = os.path.join(site, "nvidia")
        dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include"))) + sorted(
            glob.glob(os.path.join(nvidia, "*", "include")))
    return list(dict.fromkeys(dirs))


def extension():
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The torch version in the command line makes ninja recompile every object when torch changes.
    torch_tag = "-DHIPRUNE_BUILT_FOR_TORCH_" + re.sub(r"\W", "_", torch.__version__)
    cxx_flags = ["-O3", "-DHIPRUNE_PYTHON_MODULE", torch_tag]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without OpenMP here it runs every range on the calling thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sanitize = os.environ.get("HIPRUNE_SANITIZE") == "1"
    if sanitize:
        # vptr checks need the RTTI of torch's uninstrumented libraries, which would report false positives.
        flags = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all",
                 "-fno-omit-frame-pointer", "-g"]
        cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + flags
        link_flags += flags
    if sanitize or not want_cuda():
        return cpp_extension.CppExtension(
            "hiprune_ops._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return cpp_extension.CUDAExtension(
        "hiprune_ops._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + cuda_include_dirs(),
        extra_compile_args={
            "cxx": cxx_flags + ["-DHIPRUNE_WITH_CUDA"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DHIPRUNE_WITH_CUDA", torch_tag],
        },
        extra_link_args=link_flags,
    )


TORCH_VERSION_FILE = "_C.torch_version"


class BuildExtensionForThisTorch(cpp_extension.BuildExtension):
    """Records the torch the extension is compiled against, and rebuilds it when that torch changed."""

    def build_extension(self, ext):
        record = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), TORCH_VERSION_FILE)
        built_for = open(record).read().strip() if os.path.exists(record) else None
        if built_for != torch.__version__:
            self.force = True  # the sources did not change, the headers and ABI they compile against did
        super().build_extension(ext)
        write_torch_version(record)

    def run(self):
        super().run()
        if self.inplace:  # setuptools builds into build/, then copies the extension into the package
            write_torch_version(os.path.join(ROOT, "hiprune_ops", TORCH_VERSION_FILE))


def write_torch_version(path):
    with open(path, "w") as f:
        f.write(torch.__version__ + "\n")


setup(
    ext_modules=[] if os.environ.get("HIPRUNE_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtensionForThisTorch},
)
