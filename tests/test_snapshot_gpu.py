"""The libcuda checkpoint binding: struct layouts match the driver's headers; without a driver the
GPU path says exactly why it cannot run; with one, device memory survives suspend/resume."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from snapshot import gpu


@pytest.mark.parametrize("struct", [gpu.LockArgs, gpu.CheckpointArgs, gpu.UnlockArgs,
                                    gpu.RestoreArgs128, gpu.RestoreArgs129])
def test_argument_structs_are_64_bytes_and_zeroed(struct):
    assert ctypes.sizeof(struct) == 64
    assert bytes(struct()) == b"\0" * 64


def test_field_offsets_match_cuda_h():
    assert (gpu.LockArgs.timeoutMs.offset, gpu.LockArgs.reserved0.offset,
            gpu.LockArgs.reserved1.offset) == (0, 4, 8)
    assert (gpu.RestoreArgs129.gpuPairs.offset, gpu.RestoreArgs129.gpuPairsCount.offset,
            gpu.RestoreArgs129.reserved.offset, gpu.RestoreArgs129.reserved1.offset) == (0, 8, 12, 56)
    assert ctypes.sizeof(gpu.GpuPair) == 32 and gpu.GpuPair.newUuid.offset == 16
    lock = gpu.LockArgs(timeoutMs=2500)
    assert bytes(lock)[:4] == (2500).to_bytes(4, "little") and bytes(lock)[4:] == b"\0" * 60


def test_restore_layout_follows_the_driver_version():
    assert gpu.restore_args_type(12080) is gpu.RestoreArgs128
    assert gpu.restore_args_type(12090) is gpu.RestoreArgs129
    assert gpu.restore_args_type(13000) is gpu.RestoreArgs129


def test_errors_are_named_and_explained():
    with pytest.raises(gpu.GpuError) as exc:
        gpu.Cuda._check(801, "cuCheckpointProcessCheckpoint", 42)
    assert exc.value.code is gpu.CuResult.NOT_SUPPORTED
    assert "pid 42" in str(exc.value) and "UVM" in str(exc.value)
    with pytest.raises(gpu.GpuError, match="error 12345"):
        gpu.Cuda._check(12345, "cuInit")
    gpu.Cuda._check(0, "fine")
    assert gpu.ProcessState(2) is gpu.ProcessState.CHECKPOINTED


def test_without_a_driver_the_reason_is_exact():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        reason = gpu.skip_reason()
        assert reason is not None and "libcuda.so.1 cannot be loaded" in reason
        assert "no NVIDIA driver" in reason
        with pytest.raises(gpu.GpuError, match="no NVIDIA driver"):
            gpu.Cuda()
    else:
        pytest.skip("this machine has libcuda: the no-driver path cannot be shown here")


GPU_SKIP = gpu.skip_reason()


@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_device_tensors_survive_suspend_and_resume():
    """A torch process's device memory is checkpointed into host memory and restored bit for bit
    (the GPU half of a snapshot; CRIU carries the host half)."""
    program = textwrap.dedent("""
        import hashlib, sys, torch
        if not torch.cuda.is_available():
            print("NOCUDA", flush=True); sys.exit(0)
        g = torch.Generator(device="cuda").manual_seed(1)
        t = torch.randn(256, 1024, 1024, device="cuda", generator=g)  # 1 GiB on the device
        torch.cuda.synchronize()
        print(hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest(), flush=True)
        sys.stdin.readline()
        print(hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    before = proc.stdout.readline().strip()
    if before == "NOCUDA":
        proc.wait()
        pytest.skip("torch in this environment has no CUDA support")
    cuda = gpu.Cuda()
    assert cuda.state(proc.pid) is gpu.ProcessState.RUNNING
    cuda.suspend(proc.pid)
    assert cuda.state(proc.pid) is gpu.ProcessState.CHECKPOINTED
    cuda.resume(proc.pid)
    assert cuda.state(proc.pid) is gpu.ProcessState.RUNNING
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == before
    assert proc.wait(60) == 0


FAKE_LIBCUDA = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static int state;
static void record(const char *name, int pid, const void *args) {
    FILE *f = fopen(getenv("FAKE_CUDA_LOG"), "a");
    fprintf(f, "%s %d ", name, pid);
    for (int i = 0; i < 64; i++) fprintf(f, "%02x", ((const unsigned char *)args)[i]);
    fprintf(f, "\n");
    fclose(f);
}
static int failing(const char *name) {
    const char *f = getenv("FAKE_CUDA_FAIL");
    return f && strcmp(f, name) == 0;
}
int cuInit(unsigned flags) { return 0; }
int cuDriverGetVersion(int *v) { *v = atoi(getenv("FAKE_CUDA_VERSION")); return 0; }
#ifndef NO_LOCK
int cuCheckpointProcessLock(int pid, void *a) { record("lock", pid, a); if (failing("lock")) return 909; state = 1; return 0; }
#endif
int cuCheckpointProcessCheckpoint(int pid, void *a) { record("checkpoint", pid, a); if (failing("checkpoint")) return 801; state = 2; return 0; }
int cuCheckpointProcessRestore(int pid, void *a) { record("restore", pid, a); state = 1; return 0; }
int cuCheckpointProcessUnlock(int pid, void *a) { record("unlock", pid, a); state = 0; return 0; }
int cuCheckpointProcessGetState(int pid, int *s) { *s = state; return 0; }
"""


@pytest.fixture
def fake_libcuda(tmp_path, monkeypatch):
    """A stand-in driver library with the checkpoint API's symbols that records each call and its
    argument bytes: the binding's call sequence and structs are checked without a GPU."""
    import shutil as sh
    if not sh.which("cc"):
        pytest.skip("no C compiler (apt-get install build-essential) to build the stand-in libcuda")
    src = tmp_path / "fake.c"
    src.write_text(FAKE_LIBCUDA)
    libs = {}
    for name, flags in (("full", []), ("nolock", ["-DNO_LOCK"])):
        out = tmp_path / f"libcuda-{name}.so"
        subprocess.run(["cc", "-shared", "-fPIC", *flags, "-o", str(out), str(src)], check=True)
        libs[name] = str(out)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_CUDA_LOG", str(log))
    monkeypatch.setenv("FAKE_CUDA_VERSION", "12090")
    monkeypatch.delenv("FAKE_CUDA_FAIL", raising=False)
    return libs, log


def _calls(log):
    return [(line.split()[0], int(line.split()[1]), bytes.fromhex(line.split()[2]))
            for line in log.read_text().splitlines()]


def test_suspend_and_resume_call_the_driver_in_order_with_zeroed_args(fake_libcuda):
    libs, log = fake_libcuda
    cuda = gpu.Cuda(libs["full"])
    assert cuda.version == 12090
    cuda.suspend(4242, timeout_ms=7000)
    assert cuda.state(4242) is gpu.ProcessState.CHECKPOINTED
    cuda.resume(4242)
    assert cuda.state(4242) is gpu.ProcessState.RUNNING
    calls = _calls(log)
    assert [(c[0], c[1]) for c in calls] == [("lock", 4242), ("checkpoint", 4242),
                                             ("restore", 4242), ("unlock", 4242)]
    assert calls[0][2] == (7000).to_bytes(4, "little") + b"\0" * 60
    assert all(c[2] == b"\0" * 64 for c in calls[1:])


def test_a_failed_checkpoint_unlocks_and_explains(fake_libcuda, monkeypatch):
    libs, log = fake_libcuda
    monkeypatch.setenv("FAKE_CUDA_FAIL", "checkpoint")
    cuda = gpu.Cuda(libs["full"])
    with pytest.raises(gpu.GpuError, match="CUDA_ERROR_NOT_SUPPORTED.*UVM") as exc:
        cuda.suspend(99)
    assert exc.value.code is gpu.CuResult.NOT_SUPPORTED
    assert [c[0] for c in _calls(log)] == ["lock", "checkpoint", "unlock"]


def test_old_or_incomplete_drivers_are_refused(fake_libcuda, monkeypatch):
    libs, _ = fake_libcuda
    monkeypatch.setenv("FAKE_CUDA_VERSION", "12040")
    with pytest.raises(gpu.GpuError, match=r"supports CUDA 12\.4; GPU snapshots need CUDA 12\.8"):
        gpu.Cuda(libs["full"])
    monkeypatch.setenv("FAKE_CUDA_VERSION", "12090")
    with pytest.raises(gpu.GpuError, match="has no cuCheckpointProcessLock"):
        gpu.Cuda(libs["nolock"])


def test_restore_refuses_another_gpu_model(monkeypatch):
    from snapshot import restore
    monkeypatch.setattr(gpu, "gpu_models", lambda: ["NVIDIA A100-SXM4-80GB"])
    with pytest.raises(gpu.GpuError, match="GPU state from NVIDIA H100 80GB HBM3; this machine has "
                                           "NVIDIA A100-SXM4-80GB"):
        restore._check_gpus({"models": ["NVIDIA H100 80GB HBM3"], "ns_pids": [1]})
    monkeypatch.setattr(gpu, "gpu_models", lambda: [])
    with pytest.raises(gpu.GpuError, match="this machine has no NVIDIA GPU"):
        restore._check_gpus({"models": ["NVIDIA H100 80GB HBM3"], "ns_pids": [1]})
