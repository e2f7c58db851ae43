"""The snapshot helper's mark of wipe-on-fork memory in a restored copy's other processes (its
at-fork hook), run here without CRIU: the record a restore writes is written by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lazyfs.runner.helper import SOURCE

PROGRAM = r'''
import ctypes, json, mmap, os, sys
where, when = sys.argv[1], sys.argv[2]
m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = b"\x5a" * len(m)
at = ctypes.addressof(ctypes.c_char.from_buffer(m))
record = json.dumps({str(os.getpid()): [[at, at + len(m)]]})

def restored():  # what a restore writes into the copy (the record first, while the tree is stopped)
    with open(os.path.join(where, "wipe-on-fork"), "w") as f:
        f.write(record)
    open(os.path.join(where, "restored"), "w").write("7\n")

if when == "before-import":  # a process started in a restored copy, whose pid the record names
    restored()
import lazyfs_snapshot
if when == "after-import":  # a process of the snapshot: the copy it is in was restored since
    restored()
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.write(w, m[:2].hex().encode())
    os._exit(0)
os.waitpid(child, 0)
print(when, os.read(r, 4).decode())
'''


def _run(tmp_path, when: str) -> str:
    where = tmp_path / when
    where.mkdir()
    env = {**os.environ, "LAZYFS_SNAPSHOT_DIR": str(where), "PYTHONPATH": str(SOURCE.parent)}
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(where), when], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[1]


def test_a_process_of_the_snapshot_marks_its_memory_again_before_its_first_fork_in_a_copy(tmp_path):
    assert _run(tmp_path, "after-import") == "0000"  # marked: its child gets the memory wiped


def test_a_process_started_in_a_copy_never_takes_the_record_s_ranges_for_its_own(tmp_path):
    assert _run(tmp_path, "before-import") == "5a5a"  # its pid is named, but not for it
    assert json.loads((tmp_path / "before-import" / "wipe-on-fork").read_text())
