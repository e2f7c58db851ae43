"""snapshot.restorer.own_proc: the /proc a restored tree's root had from the host replaced by one
of the tree's own PID namespace, in the tree's mount namespace, and a clear error when it cannot."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from lazyfs.errors import RunError
from snapshot import restorer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                reason="needs root, unshare(1) and nsenter(1) for namespaces")


@pytest.fixture
def tree(tmp_path):
    """A stand-in for a tree criu made: the init of a PID namespace of its own, in a mount
    namespace where its root's /proc is the host's (bound, as the restore mounts it first)."""
    target = tmp_path / "ws" / "rootfs" / "proc"
    target.mkdir(parents=True)
    unshare = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                                "sh", "-c", f"mount --bind /proc {target} && touch {tmp_path}/up && exec sleep 60"])
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "up").exists():
            assert unshare.poll() is None and time.monotonic() < deadline, "the namespaces did not come up"
            time.sleep(0.01)
        init = int(open(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read().split()[0])
        yield init, tmp_path / "ws", target
    finally:
        unshare.kill()  # (the namespace's init dies with it: --kill-child)
        unshare.wait()


def _pids(init: int, target) -> list[str]:
    """What the tree's root sees in its /proc."""
    out = subprocess.run(["nsenter", "-t", str(init), "-m", "ls", str(target)], capture_output=True,
                         text=True, check=True).stdout
    return sorted(name for name in out.split() if name.isdigit())


def test_the_tree_sees_its_own_processes_once_its_proc_is_replaced(tree):
    init, ws, target = tree
    assert len(_pids(init, target)) > 1  # the host's: every process on the machine
    restorer.own_proc(init, str(ws))
    assert _pids(init, target) == ["1"]  # its init, and nothing of the host's
    assert os.readlink("/proc/self") == str(os.getpid())  # the restore's own /proc is untouched


def test_a_proc_that_cannot_be_mounted_says_why(tree, tmp_path):
    init, _, _ = tree
    with pytest.raises(RunError, match=r"cannot mount the restored tree's own /proc: No such file or directory"):
        restorer.own_proc(init, str(tmp_path / "elsewhere"))
    with pytest.raises(RunError, match="cannot mount the restored tree's own /proc"):
        restorer.own_proc(2 ** 22 + 1, str(tmp_path))  # no such process: its namespaces cannot be opened
