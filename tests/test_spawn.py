"""Starting processes: a Ctrl-C that lands while one is forked is never lost."""
from __future__ import annotations

import subprocess
import sys

import pytest

# A Ctrl-C that lands inside os.fork (sent from an at-fork hook, where a real one can land).
PROGRAM = """
import os, signal, sys
from lazyfs.proc import spawn
armed = [True]
def ctrl_c():
    if armed[0]:
        armed[0] = False
        os.kill(os.getpid(), signal.SIGINT)
os.register_at_fork(before=ctrl_c)
pid = None
try:
    if sys.argv[1] == "plain":
        pid = os.fork()
    else:
        with spawn.holding_sigint():
            pid = os.fork()
    if pid == 0:
        os._exit(0)
    print("lost", flush=True)
except KeyboardInterrupt:
    print("raised", flush=True)
if pid:
    os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("how,outcome", [("plain", "lost"), ("held", "raised")])
def test_a_ctrl_c_during_a_fork_is_raised_once_the_start_is_done(how, outcome):
    """Plain, CPython prints the KeyboardInterrupt from inside its at-fork hook and drops it (a
    restore went on as if nobody had asked it to stop); held back, it is raised in the caller."""
    r = subprocess.run([sys.executable, "-c", PROGRAM, how], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == outcome, r.stderr
