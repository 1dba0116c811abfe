"""Builds hiprune_ops._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch exist.

HIPRUNE_CUDA=0 skips the CUDA kernels, HIPRUNE_CUDA=1 requires them; TORCH_CUDA_ARCH_LIST (default "9.0")
picks the GPU architectures. HIPRUNE_NO_EXTENSION=1 installs the Python package alone (the Makefile then builds
the extension in place, incrementally).
"""

import glob
import os
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
    cxx_flags = ["-O3", "-DHIPRUNE_PYTHON_MODULE"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without OpenMP here it runs every range on the calling thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not want_cuda():
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
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DHIPRUNE_WITH_CUDA"],
        },
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[] if os.environ.get("HIPRUNE_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
