"""Compile MSL source as C++ with g++ against ``msl_emu.h`` and load its kernels with ctypes.

For every ``kernel void name(...)`` in the source, a generated ``extern "C"`` driver binds
the parameters the way Metal does, from their attributes: ``[[buffer(i)]]`` gets the i-th
buffer of the dispatch, ``[[thread_position_in_grid]]`` and the other position attributes
get the thread's ids from the scheduler in ``msl_emu.h``. The shared library is built once
per source text, emulation and compiler, into a cache directory shared by every process of
the user.

Beyond what g++ checks, the build rejects what Apple's compiler or pipeline creation would,
or what would differ on the GPU:

* address spaces: every ``device T*`` / ``constant T*`` becomes a ``msl_emu::pointer`` of its
  own type per address space (:func:`translate`), so a missing or wrong qualifier is a compile
  error, and each access is checked against the bound buffer's size when the kernel runs;
* threadgroup memory: a kernel whose ``threadgroup`` variables add up to more than
  ``THREADGROUP_MEMORY_BYTES`` cannot be run (:meth:`EmulatedLibrary.check_pipeline`);
* fastMath, with which Apple compiles by default and under which ``/`` on floats is
  approximate: a float division written in the shader is an error, the shaders write
  ``precise::divide`` (:func:`fast_math_divisions`). The rule is checked on g++'s GIMPLE, so it
  knows the operands' types: integer ``/`` (exact under fastMath too) is not flagged.
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
THREADGROUP_MEMORY_BYTES = 32 * 1024
"""Apple GPUs' maxThreadgroupMemoryLength: creating a pipeline that declares more fails."""

# The thread-position attributes a kernel parameter may carry (fields of msl_emu::ThreadIds).
POSITION_ATTRIBUTES = frozenset({
    "thread_position_in_grid", "threads_per_grid", "threadgroup_position_in_grid", "threadgroups_per_grid",
    "thread_position_in_threadgroup", "thread_index_in_threadgroup", "threads_per_threadgroup",
    "thread_index_in_simdgroup", "threads_per_simdgroup", "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
})

_KERNEL = re.compile(r"\bkernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
# `[const] device|constant [const] T [const] *`: a pointer into a buffer (group 1: address space).
_SPACE_POINTER = re.compile(
    r"\b(?:const\s+)?(device|constant)\s+(?:const\s+)?([A-Za-z_][\w:]*)(?:\s+const)?\s*\*", re.S
)
# `threadgroup T name[...]...;`: a threadgroup variable (the only form the emulation takes).
_THREADGROUP_VARIABLE = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:]*)\s+(\w+)\s*((?:\[[^\]\[]+\]\s*)*);")
# A float division in g++'s GIMPLE dump of the shader, with its line in the .metal file.
_FLOAT_DIVISION = re.compile(r"\[[^\]]*shader\.metal:(\d+):\d+\] gimple_assign <rdiv_expr")
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
    threadgroup_variables: tuple[str, ...] = ()
    """The C++ types of the kernel's ``threadgroup`` variables (``char4[32][64]``), for their sizes."""

    @property
    def buffer_count(self) -> int:
        indices = [p.index for p in self.parameters if p.attribute == "buffer"]
        return max(indices) + 1 if indices else 0


def parse_kernels(source: str) -> list[KernelSignature]:
    """The ``kernel`` functions of an MSL source, with their parameters' attributes and threadgroup variables."""
    code = _strip_comments(source)
    kernels = []
    claimed = set()
    for match in _KERNEL.finditer(code):
        body = code[match.end() : _closing_brace(code, match.end())]
        variables = []
        for variable in _THREADGROUP_VARIABLE.finditer(body):
            variables.append(variable[1] + "".join(variable[3].split()))
            claimed.add(match.end() + variable.start())
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
        kernels.append(KernelSignature(match.group(1), tuple(parameters), tuple(variables)))
    for other in re.finditer(r"\bthreadgroup\b", code):
        if other.start() not in claimed:
            line = code.count("\n", 0, other.start()) + 1
            raise EmulationError(f"line {line}: the emulation takes `threadgroup` only as a variable "
                                 "`threadgroup T name[...];` in a kernel's body")
    return kernels


def _strip_comments(source: str) -> str:
    # Each comment becomes as many newlines as it spans, so line numbers stay those of the source.
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda c: " " + "\n" * c[0].count("\n"), source, flags=re.S)


def _closing_brace(code: str, start: int) -> int:
    """The index of the ``}`` that closes the block opened just before ``start``."""
    depth = 1
    for i in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return i
    raise EmulationError("unbalanced braces in the MSL source")


def translate(source: str) -> str:
    """The MSL source as the emulation compiles it: each ``device T*`` / ``constant T*`` a ``msl_emu::pointer``.

    Lines keep their numbers, so g++'s messages point into the .metal file.
    """
    def pointer(match: re.Match) -> str:
        const = "const " if re.search(r"\bconst\b", match[0]) else ""
        return f"msl_emu::{match[1]}_pointer<{const}{match[2]}>" + "\n" * match[0].count("\n")

    return _SPACE_POINTER.sub(pointer, source)


def fast_math_divisions(gimple: str, source: str) -> list[str]:
    """The float divisions written in ``source``, found in g++'s ``-fdump-tree-gimple-raw-lineno`` dump of it.

    Apple compiles with fastMath by default, under which ``a / b`` on floats may be an
    approximate reciprocal and multiply; the shaders' rule is that every float division is
    ``precise::divide(a, b)``, which is correctly rounded either way. In GIMPLE a float
    division is an ``rdiv_expr`` (integer division, exact under fastMath too, is another
    code), located at its line in the .metal file; the one in ``precise::divide`` itself is
    located in ``msl_emu.h`` and passes.
    """
    lines = source.splitlines()
    found = sorted({int(line) for line in _FLOAT_DIVISION.findall(gimple)})
    return [f"line {n}: {lines[n - 1].strip()}" for n in found]


def driver_source(kernels: list[KernelSignature]) -> str:
    """C++ for one ``extern "C" msl_emu_run_<kernel>`` per kernel (appended after the MSL source)."""
    parts = []
    for kernel in kernels:
        arguments = []
        for p in kernel.parameters:
            if p.attribute == "buffer":
                arguments.append(f"msl_emu::buffer_binding{{buffers[{p.index}], sizes[{p.index}], {p.index}}}")
            else:
                arguments.append(f"ids.{p.attribute}")
        threadgroup_bytes = " + ".join(f"sizeof({t})" for t in kernel.threadgroup_variables) or "0"
        parts.append(
            f'extern "C" unsigned long long msl_emu_threadgroup_bytes_{kernel.name}()\n'
            f"{{\n"
            f"    return {threadgroup_bytes};\n"
            f"}}\n"
            f"\n"
            f'extern "C" int msl_emu_run_{kernel.name}(void* const* buffers, const unsigned long long* sizes,\n'
            f"        unsigned nbuffers, unsigned long long count, unsigned width, int reverse,\n"
            f"        char* error, unsigned error_size)\n"
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
        # The checks in this file are part of what a cached library passed, so they key it too.
        build = "\n".join([source, HEADER.read_text(), Path(__file__).read_text(), driver, *CXX_FLAGS, cxx])
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        library = folder / f"{hashlib.sha256(build.encode()).hexdigest()[:24]}.so"
        if not library.exists():  # a library in the cache passed every check of _compile
            _compile(cxx, source, driver, folder, library)
        self._dll = ctypes.CDLL(str(library))
        self._entry = {}
        self.threadgroup_bytes = {}
        for name in self.kernels:
            entry = getattr(self._dll, f"msl_emu_run_{name}")
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_uint,
                              ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            self._entry[name] = entry
            size = getattr(self._dll, f"msl_emu_threadgroup_bytes_{name}")
            size.restype = ctypes.c_ulonglong
            self.threadgroup_bytes[name] = size()

    def check_pipeline(self, name: str) -> None:
        """Raise EmulationError where Apple's pipeline creation for kernel ``name`` would fail.

        That is: no such kernel, or threadgroup variables larger than ``THREADGROUP_MEMORY_BYTES``
        in all (Apple's compiler accepts such a kernel; making its pipeline fails).
        """
        if name not in self._entry:
            raise EmulationError(f"no kernel named {name!r}; this source has {', '.join(sorted(self._entry))}")
        if self.threadgroup_bytes[name] > THREADGROUP_MEMORY_BYTES:
            raise EmulationError(f"kernel {name}: its threadgroup variables take {self.threadgroup_bytes[name]} "
                                 f"bytes, more than the {THREADGROUP_MEMORY_BYTES} an Apple GPU has")

    def run(self, name: str, count: int, buffers: list[tuple[int, int]], width: int, reverse: bool = False) -> None:
        """Dispatch kernel ``name`` over ``count`` threads in threadgroups of ``width``.

        ``buffers`` are the (address, size in bytes) of the buffers bound at ``[[buffer(0)]]``,
        ``[[buffer(1)]]``, ... Raises EmulationError where :meth:`check_pipeline` does, and with
        the scheduler's message if the kernel misuses a barrier or a SIMD-group function,
        accesses a buffer outside its size, or if the number of buffers does not match the kernel.
        """
        self.check_pipeline(name)
        slots = max(len(buffers), 1)
        pointers = (ctypes.c_void_p * slots)(*(address for address, _ in buffers))
        sizes = (ctypes.c_ulonglong * slots)(*(size for _, size in buffers))
        error = ctypes.create_string_buffer(ERROR_BYTES)
        if self._entry[name](pointers, sizes, len(buffers), count, width, int(reverse), error, ERROR_BYTES):
            raise EmulationError(f"kernel {name}: {error.value.decode()}")


def _compile(cxx: str, source: str, driver: str, folder: Path, library: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as work:
        shader = Path(work) / "shader.metal"
        shader.write_text(translate(source))
        unit = Path(work) / "unit.cpp"
        unit.write_text(f'#include "{shader}"\n\n{driver}')
        built = Path(work) / "library.so"
        gimple = Path(work) / "unit.gimple"
        result = subprocess.run([cxx, *CXX_FLAGS, f"-fdump-tree-gimple-raw-lineno={gimple}", "-I", str(INCLUDE_DIR),
                                 "-o", str(built), str(unit)], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulationError(f"{cxx} could not compile the MSL source as C++:\n{result.stderr[-4000:]}")
        divisions = fast_math_divisions(gimple.read_text(), source)
        if divisions:
            raise EmulationError("float division with `/`, which fastMath (Apple's default) makes approximate; "
                                 "write precise::divide(a, b):\n" + "\n".join(divisions))
        os.replace(built, library)  # atomic: a concurrent build of the same source loses nothing


@functools.cache
def load(source: str) -> EmulatedLibrary:
    """The library of ``source``, built (or taken from the disk cache) once per process."""
    return EmulatedLibrary(source)
