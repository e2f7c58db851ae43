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
