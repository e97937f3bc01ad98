"""Compile MSL source as C++ with g++ against ``msl_emu.h`` and load its kernels with ctypes.

For every ``kernel void name(...)`` in the source, a generated ``extern "C"`` driver binds
the parameters the way Metal does, from their attributes: ``[[buffer(i)]]`` gets the i-th
buffer of the dispatch, ``[[thread_position_in_grid]]`` and the other position attributes
get the thread's ids from the scheduler in ``msl_emu.h``. The shared library is built once
per source text and compiler, into a cache directory shared by every process of the user.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE_DIR = HERE / "include"
HEADER = HERE / "msl_emu.h"
CXX_FLAGS = (
    "-std=c++20", "-O2", "-fPIC", "-shared",
    "-fsigned-char",        # MSL's char is signed
    "-ffp-contract=off",    # no fused multiply-add: each float operation rounds once, as written
    "-Wall", "-Wno-attributes", "-Wno-unknown-pragmas",
)
ERROR_BYTES = 1024

# The thread-position attributes a kernel parameter may carry (fields of msl_emu::ThreadIds).
POSITION_ATTRIBUTES = frozenset({
    "thread_position_in_grid", "threads_per_grid", "threadgroup_position_in_grid", "threadgroups_per_grid",
    "thread_position_in_threadgroup", "thread_index_in_threadgroup", "threads_per_threadgroup",
    "thread_index_in_simdgroup", "threads_per_simdgroup", "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
})

_KERNEL = re.compile(r"\bkernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
_PARAMETER = re.compile(
    r"^(?P<type>.+?)\s*\b(?P<name>\w+)\s*\[\[\s*(?P<attribute>\w+)\s*(?:\(\s*(?P<index>\d+)\s*\))?\s*\]\]$", re.S
)


class EmulationError(RuntimeError):
    """The emulation cannot build a source, or a kernel did what the GPU would not run."""


@dataclass(frozen=True)
class Parameter:
    type: str
    name: str
    attribute: str
    index: int | None


@dataclass(frozen=True)
class KernelSignature:
    name: str
    parameters: tuple[Parameter, ...]

    @property
    def buffer_count(self) -> int:
        indices = [p.index for p in self.parameters if p.attribute == "buffer"]
        return max(indices) + 1 if indices else 0


def parse_kernels(source: str) -> list[KernelSignature]:
    """The ``kernel`` functions of an MSL source, with their parameters' attributes."""
    kernels = []
    for match in _KERNEL.finditer(_strip_comments(source)):
        parameters = []
        for text in match.group(2).split(","):
            parsed = _PARAMETER.match(" ".join(text.split()))
            if parsed is None:
                raise EmulationError(f"kernel {match.group(1)}: cannot read parameter {text.strip()!r}")
            attribute = parsed["attribute"]
            if attribute != "buffer" and attribute not in POSITION_ATTRIBUTES:
                raise EmulationError(f"kernel {match.group(1)}: the emulation does not provide [[{attribute}]]")
            index = int(parsed["index"]) if parsed["index"] is not None else None
            parameters.append(Parameter(parsed["type"], parsed["name"], attribute, index))
        kernels.append(KernelSignature(match.group(1), tuple(parameters)))
    return kernels


def _strip_comments(source: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)


def driver_source(kernels: list[KernelSignature]) -> str:
    """C++ for one ``extern "C" msl_emu_run_<kernel>`` per kernel (appended after the MSL source)."""
    parts = []
    for kernel in kernels:
        arguments = []
        for p in kernel.parameters:
            if p.attribute == "buffer":
                arguments.append(f"({p.type})buffers[{p.index}]")
            else:
                arguments.append(f"ids.{p.attribute}")
        parts.append(
            f'extern "C" int msl_emu_run_{kernel.name}(void* const* buffers, unsigned nbuffers,\n'
            f"        unsigned long long count, unsigned width, int reverse, char* error, unsigned error_size)\n"
            f"{{\n"
            f"    std::string message;\n"
            f"    if (nbuffers != {kernel.buffer_count}) {{\n"
            f'        message = "binds {kernel.buffer_count} buffers, the dispatch passed " '
            f"+ std::to_string(nbuffers);\n"
            f"    }} else {{\n"
            f"        message = msl_emu::dispatch([&](const msl_emu::ThreadIds& ids) {{\n"
            f"            {kernel.name}({', '.join(arguments)});\n"
            f"        }}, count, width, reverse != 0);\n"
            f"    }}\n"
            f"    std::snprintf(error, error_size, \"%s\", message.c_str());\n"
            f"    return message.empty() ? 0 : 1;\n"
            f"}}\n"
        )
    return "#include <cstdio>\n\n" + "\n".join(parts)


def find_compiler() -> str | None:
    """The C++ compiler the emulation uses ($CXX, else g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    """Where built libraries are kept: $BITNET_MSL_EMU_CACHE, else a per-user temp folder."""
    default = Path(tempfile.gettempdir()) / f"bitnet-msl-emu-{os.getuid()}"
    return Path(os.environ.get("BITNET_MSL_EMU_CACHE", default))


class EmulatedLibrary:
    """The kernels of one MSL source, compiled for the CPU. Use :func:`load`, which builds each source once.

    Parameters
    ----------
    source : str
        MSL source text, as given to ``metalcompute``'s ``Device.kernel``.
    """

    def __init__(self, source: str) -> None:
        self.kernels = {k.name: k for k in parse_kernels(source)}
        cxx = find_compiler()
        if cxx is None:
            raise EmulationError("no C++ compiler found (install g++ or set $CXX)")
        driver = driver_source(list(self.kernels.values()))
        build = "\n".join([source, HEADER.read_text(), driver, *CXX_FLAGS, cxx])
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        library = folder / f"{hashlib.sha256(build.encode()).hexdigest()[:24]}.so"
        if not library.exists():
            _compile(cxx, source, driver, folder, library)
        self._dll = ctypes.CDLL(str(library))
        self._entry = {}
        for name in self.kernels:
            entry = getattr(self._dll, f"msl_emu_run_{name}")
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_uint,
                              ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            self._entry[name] = entry

    def run(self, name: str, count: int, pointers: list[int], width: int, reverse: bool = False) -> None:
        """Dispatch kernel ``name`` over ``count`` threads in threadgroups of ``width``.

        ``pointers`` are the addresses of the buffers bound at ``[[buffer(0)]]``, ``[[buffer(1)]]``, ...
        Raises EmulationError with the scheduler's message if the kernel misuses a barrier or a
        SIMD-group function, or if the number of buffers does not match the kernel.
        """
        if name not in self._entry:
            raise EmulationError(f"no kernel named {name!r}; this source has {', '.join(sorted(self._entry))}")
        array = (ctypes.c_void_p * max(len(pointers), 1))(*pointers)
        error = ctypes.create_string_buffer(ERROR_BYTES)
        if self._entry[name](array, len(pointers), count, width, int(reverse), error, ERROR_BYTES):
            raise EmulationError(f"kernel {name}: {error.value.decode()}")


def _compile(cxx: str, source: str, driver: str, folder: Path, library: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as work:
        shader = Path(work) / "shader.metal"
        shader.write_text(source)
        unit = Path(work) / "unit.cpp"
        unit.write_text(f'#include "{shader}"\n\n{driver}')
        built = Path(work) / "library.so"
        result = subprocess.run([cxx, *CXX_FLAGS, "-I", str(INCLUDE_DIR), "-o", str(built), str(unit)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulationError(f"{cxx} could not compile the MSL source as C++:\n{result.stderr[-4000:]}")
        os.replace(built, library)  # atomic: a concurrent build of the same source loses nothing


@functools.cache
def load(source: str) -> EmulatedLibrary:
    """The library of ``source``, built (or taken from the disk cache) once per process."""
    return EmulatedLibrary(source)
