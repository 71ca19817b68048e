"""Which inner loop of the CPU engine runs on this machine (torch-free: numpy/llvmlite only).

The engine has one packed weight layout and one NumPy reference, and several inner loops, one
per instruction set (``kernels_vnni`` emits their LLVM IR). Each loop has a small integer id,
its index in ``LOOPS``; the Numba code passes that id to the kernels as a compile-time
constant, so only the chosen loop is compiled.

==============  ===========================================================  =================
loop            products                                                     needs
==============  ===========================================================  =================
avx512-vnni     ``vpdpbusd`` on zmm (u8 × s8, 4 products per i32 lane)       AVX512-VNNI + BW
avx-vnni        VEX ``vpdpbusd`` on ymm                                      AVX-VNNI
avx2            ``vpmaddubsw`` + ``vpmaddwd`` (8-bit codes: sign trick)      AVX2
neon-dotprod    ``sdot`` by element (codes made signed)                      AArch64 asimddp
neon            ``smull`` + ``sadalp`` (s16 products, pairwise-widened)      AArch64 asimd
portable        plain vector IR: i16 products, widened to i32                any LLVM target
amx-int8        batch 1 as avx512-vnni, batches on AMX tiles (``tdpbsud``)   the above + AMX-INT8
                                                                             and the kernel's
                                                                             permission
==============  ===========================================================  =================

``host_loops()`` lists the loops this CPU can execute, best first (``PREFERENCE``): on x86 from
LLVM's host feature detection (AMX also needs Linux to grant this process the tile data state,
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, requested once here), on AArch64 from
the kernel's auxiliary vector (``getauxval(AT_HWCAP)`` bit 1 asimd, bit 20 asimddp), because LLVM reports a "generic" CPU without features under emulation.
``default_loop()`` is the best of them unless ``$G2QUANT_KERNEL`` names another (old names:
``vnni`` = avx512-vnni, ``fallback`` = portable). Each loop's kernel functions carry the target
features of that loop, so a loop compiles whatever CPU Numba targets (``NUMBA_CPU_NAME``) as
long as the machine can run it; the x86 loops below AVX-512 also switch AVX-512 off inside
their kernels, so a forced ``avx2`` loop on an AVX-512 machine is real AVX2 code.
"""
from __future__ import annotations

import ctypes
import os
import platform

import llvmlite.binding as llvm

LOOPS = ("avx512-vnni", "avx-vnni", "avx2", "neon-dotprod", "neon", "portable", "amx-int8")
PREFERENCE = ("amx-int8", "avx512-vnni", "avx-vnni", "avx2", "neon-dotprod", "neon", "portable")
ALIASES = {"vnni": "avx512-vnni", "fallback": "portable"}
ENV_VAR = "G2QUANT_KERNEL"

AVX512_VNNI, AVX_VNNI, AVX2, NEON_DOTPROD, NEON, PORTABLE, AMX_INT8 = range(len(LOOPS))

# x86 features (LLVM names) each x86 loop needs
_X86_NEEDS = {"amx-int8": ("avx512f", "avx512bw", "avx512vnni", "amx-tile", "amx-int8", "amx-permitted"),
              "avx512-vnni": ("avx512f", "avx512bw", "avx512vnni"), "avx-vnni": ("avx2", "avxvnni"),
              "avx2": ("avx2",)}
_X86_REPORTED = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni", "avxvnniint8", "amx-tile",
                 "amx-int8")
_AT_HWCAP = 16
_HWCAP_ASIMD, _HWCAP_ASIMDDP, _HWCAP_SVE = 1 << 1, 1 << 20, 1 << 22
_AT_HWCAP2, _HWCAP2_I8MM = 26, 1 << 13


def loop_id(name: str) -> int:
    """The integer id of a loop name (or of an old alias: ``vnni``, ``fallback``)."""
    return LOOPS.index(canonical(name))


def loop_name(loop: int) -> str:
    """The name of a loop id."""
    if not 0 <= int(loop) < len(LOOPS):
        raise ValueError(f"loop id must be in 0..{len(LOOPS) - 1}, got {loop!r}")
    return LOOPS[int(loop)]


def canonical(name: str) -> str:
    """``name`` as one of ``LOOPS`` (aliases resolved); ValueError naming the choices otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in LOOPS:
        raise ValueError(f"unknown kernel loop {name!r}; choose one of {', '.join(LOOPS)} "
                         f"(or the old names {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return key


def machine() -> str:
    """``"x86_64"``, ``"aarch64"`` or whatever else ``platform.machine()`` says (lower case)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name (``/proc/cpuinfo``; ``platform.processor()`` is empty on Linux).

    Where a hypervisor shows only a generic name without a model number (``AMD EPYC``: a Zen 1 with
    AVX2 and a Zen 4 with AVX-512 look alike), the x86 family and model follow it, e.g. ``AMD EPYC
    (family 23, model 1)``, so results files tell such machines apart."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:      # the first processor's
            fields[key.strip()] = value.strip()
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if not any(ch.isdigit() for ch in name) and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _auxv(kind: int) -> int | None:
    """``getauxval(kind)`` of this process, None where there is no such call (not Linux)."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.getauxval
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return int(fn(kind))


_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
_amx_permission: bool | None = None


def amx_permitted() -> bool:
    """Ask Linux (once per process) for the AMX tile data state; True when granted. Without it
    the first tile instruction would kill the process."""
    global _amx_permission
    if _amx_permission is None:
        ok = False
        if machine() == "x86_64" and platform.system() == "Linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                ok = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                                  ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
            except (OSError, AttributeError):
                ok = False
        _amx_permission = ok
    return _amx_permission


def _llvm_features() -> dict:
    try:
        return {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}
    except RuntimeError:            # LLVM cannot tell (e.g. some emulators)
        return {}


def host_features() -> dict:
    """The SIMD features the loops care about, as booleans, by their usual names."""
    arch = machine()
    if arch == "aarch64":
        hw = _auxv(_AT_HWCAP)
        if hw is None:              # no auxiliary vector (macOS): trust LLVM
            f = _llvm_features()
            return {"asimd": True, "asimddp": f.get("dotprod", False), "sve": f.get("sve", False),
                    "i8mm": f.get("i8mm", False), "source": "llvm"}
        hw2 = _auxv(_AT_HWCAP2) or 0
        return {"asimd": bool(hw & _HWCAP_ASIMD), "asimddp": bool(hw & _HWCAP_ASIMDDP),
                "sve": bool(hw & _HWCAP_SVE), "i8mm": bool(hw2 & _HWCAP2_I8MM), "source": "auxv"}
    if arch in ("x86_64", "i686", "i386"):
        f = _llvm_features()
        out = {k: f.get(k, False) for k in _X86_REPORTED}
        out["amx-permitted"] = bool(out["amx-tile"] and out["amx-int8"] and amx_permitted())
        return out
    return {}


def host_loops() -> tuple[str, ...]:
    """The loops this CPU can execute, best first (``PREFERENCE`` order, ``portable`` last)."""
    arch, feats = machine(), host_features()
    loops = {"portable"}
    if arch == "x86_64":
        loops |= {name for name, needs in _X86_NEEDS.items() if all(feats.get(f) for f in needs)}
    elif arch == "aarch64":
        if feats.get("asimd") and feats.get("asimddp"):
            loops.add("neon-dotprod")
        if feats.get("asimd"):
            loops.add("neon")
    return tuple(name for name in PREFERENCE if name in loops)


def default_loop() -> str:
    """The loop to use: ``$G2QUANT_KERNEL`` when set (ValueError for an unknown name,
    RuntimeError for one this CPU cannot run), else the best of ``host_loops()``."""
    loops = host_loops()
    wanted = os.environ.get(ENV_VAR, "").strip()
    if not wanted:
        return loops[0]
    try:
        name = canonical(wanted)
    except ValueError as exc:
        raise ValueError(f"${ENV_VAR}={wanted!r}: {exc}") from None
    check_host(name, source=f"${ENV_VAR}={wanted!r}")
    return name


def check_host(name: str, source: str = "") -> str:
    """``name`` canonicalized; RuntimeError if this CPU cannot execute that loop."""
    name = canonical(name)
    loops = host_loops()
    if name not in loops:
        what = f"{source}: " if source else ""
        raise RuntimeError(f"{what}this CPU ({machine()}, {llvm.get_host_cpu_name()}) cannot run the "
                           f"{name!r} kernel loop; it can run {', '.join(loops)}")
    return name


def describe(loop: str | None = None) -> dict:
    """What benchmarks and ``g2quant bench`` record: machine, CPU name, the relevant features, the
    loops the host can run and the chosen one (``loop``, default ``default_loop()``)."""
    return {"machine": machine(), "cpu": llvm.get_host_cpu_name(), "features": host_features(),
            "host_loops": list(host_loops()), "loop": canonical(loop) if loop else default_loop(),
            "env": os.environ.get(ENV_VAR) or None, "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME") or None,
            "numba_cpu_features": os.environ.get("NUMBA_CPU_FEATURES")}
