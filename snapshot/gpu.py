"""GPU state for snapshots: libcuda's process checkpoint API through ctypes.

Order (the driver's contract): snapshot = lock (CUDA calls block, with a timeout) → checkpoint
(device memory moves into the process's host memory, device handles are released) → CRIU dump;
restore = CRIU restore → restore (memory back onto a GPU) → unlock. The driver needs version
12.8 (driver 570) or later. Every argument struct is 64 bytes and its reserved fields must be
zero; the restore arguments gained a GPU remapping table in 12.9 (same size), so the layout is
picked from cuDriverGetVersion.
"""
from __future__ import annotations

import ctypes
import enum
import os
from pathlib import Path

from lazyfs.errors import LazyfsError

MIN_DRIVER = 12080  # CUDA 12.8: driver 570, the first with cuCheckpointProcess*
GPU_PAIRS_DRIVER = 12090  # CUDA 12.9: CUcheckpointRestoreArgs.gpuPairs


class GpuError(LazyfsError):
    def __init__(self, message: str, code: "CuResult | int | None" = None):
        super().__init__(message)
        self.code = code


class CuResult(enum.IntEnum):
    SUCCESS = 0
    INVALID_VALUE = 1
    NOT_INITIALIZED = 3
    DEINITIALIZED = 4
    NO_DEVICE = 100
    INVALID_DEVICE = 101
    OPERATING_SYSTEM = 304
    ILLEGAL_STATE = 401
    NOT_FOUND = 500
    NOT_READY = 600
    NOT_PERMITTED = 800
    NOT_SUPPORTED = 801
    TIMEOUT = 909
    UNKNOWN = 999


class ProcessState(enum.IntEnum):
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class GpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", Uuid), ("newUuid", Uuid)]


class LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                ("reserved1", ctypes.c_uint64 * 7)]


class CheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class UnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class RestoreArgs128(ctypes.Structure):
    """CUDA 12.8: all reserved."""
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class RestoreArgs129(ctypes.Structure):
    """CUDA 12.9 and later: an optional table remapping old GPU UUIDs to new ones."""
    _fields_ = [("gpuPairs", ctypes.POINTER(GpuPair)), ("gpuPairsCount", ctypes.c_uint),
                ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
                ("reserved1", ctypes.c_uint64)]


def restore_args_type(driver_version: int):
    return RestoreArgs129 if driver_version >= GPU_PAIRS_DRIVER else RestoreArgs128


def uses_gpu(pid: int) -> bool:
    """Whether a process has NVIDIA device files mapped (so its GPU state must be checkpointed)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    except OSError:
        return False
    return "/dev/nvidia" in maps


class Cuda:
    """The driver library, checked for the checkpoint API. Raises GpuError saying why not."""

    def __init__(self, path: str = "libcuda.so.1"):
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as exc:
            raise GpuError(f"{path} cannot be loaded ({exc}): no NVIDIA driver on this machine") from None
        version = ctypes.c_int(0)
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        self.version = version.value
        if self.version < MIN_DRIVER:
            raise GpuError(f"the NVIDIA driver supports CUDA {self.version // 1000}."
                           f"{self.version % 1000 // 10}; GPU snapshots need CUDA 12.8 (driver 570) "
                           "or later")
        for name in ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                     "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
                     "cuCheckpointProcessGetState"):
            if not hasattr(self.lib, name):
                raise GpuError(f"{path} has no {name} (driver too old)")
        self._check(self.lib.cuInit(0), "cuInit")

    @staticmethod
    def _check(result: int, what: str, pid: int | None = None) -> None:
        if result == CuResult.SUCCESS:
            return
        try:
            code: CuResult | int = CuResult(result)
            name = code.name
        except ValueError:
            code, name = result, f"error {result}"
        hint = {CuResult.NOT_SUPPORTED: " (the process uses UVM/managed memory or CUDA IPC, which "
                                        "the checkpoint API does not support, or the GPU does not)",
                CuResult.TIMEOUT: " (a CUDA call in the process did not finish within the lock timeout)",
                CuResult.ILLEGAL_STATE: " (the process is not in the state this step needs)",
                CuResult.NOT_INITIALIZED: " (the process has not initialised CUDA)"}.get(code, "")
        target = f" for pid {pid}" if pid is not None else ""
        raise GpuError(f"{what}{target} failed: CUDA_ERROR_{name}{hint}", code)

    def state(self, pid: int) -> ProcessState:
        value = ctypes.c_int(0)
        self._check(self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(value)),
                    "cuCheckpointProcessGetState", pid)
        return ProcessState(value.value)

    def lock(self, pid: int, timeout_ms: int = 10_000) -> None:
        args = LockArgs(timeoutMs=timeout_ms)
        self._check(self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)),
                    "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        args = CheckpointArgs()
        self._check(self.lib.cuCheckpointProcessCheckpoint(pid, ctypes.byref(args)),
                    "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int) -> None:
        args = restore_args_type(self.version)()
        self._check(self.lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)),
                    "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        args = UnlockArgs()
        self._check(self.lib.cuCheckpointProcessUnlock(pid, ctypes.byref(args)),
                    "cuCheckpointProcessUnlock", pid)

    def suspend(self, pid: int, timeout_ms: int = 10_000) -> None:
        """Before a CRIU dump: RUNNING → LOCKED → CHECKPOINTED (unlocks again on failure)."""
        self.lock(pid, timeout_ms)
        try:
            self.checkpoint(pid)
        except GpuError:
            self.unlock(pid)
            raise

    def resume(self, pid: int) -> None:
        """After a CRIU restore: CHECKPOINTED → LOCKED → RUNNING."""
        self.restore(pid)
        self.unlock(pid)


def gpu_models() -> list[str]:
    """Names of the GPUs on this machine (empty without a driver), from the driver's proc files."""
    base = Path("/proc/driver/nvidia/gpus")
    names = []
    if base.is_dir():
        for gpu in sorted(base.iterdir()):
            for line in (gpu / "information").read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
    return names


def skip_reason() -> str | None:
    try:
        Cuda()
    except GpuError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "GPU checkpoints of another process need root"
    return None
