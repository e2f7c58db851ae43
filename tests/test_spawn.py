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


# A caller whose log handler and sys.stderr sit on descriptors of their own (as under pytest's
# capture, or a program logging to a file), forking a daemon that logs, prints, and opens a file.
DAEMON = """
import logging, os, sys
from lazyfs.proc import spawn
d = sys.argv[1]
logging.basicConfig(filename=os.path.join(d, "caller.log"), level=logging.INFO)
sys.stderr = open(os.path.join(d, "caller.err"), "w")
r, w = os.pipe()
def run():
    f = open(os.path.join(d, "reused"), "w")  # takes a number the caller's objects had
    logging.getLogger("lazyfs.test").info("daemon logged")
    print("daemon printed", file=sys.stderr, flush=True)
    f.write("only this")
    f.close()
    os.write(w, b"1")
    return 0
pid = spawn.fork_detached(run, os.path.join(d, "daemon.log"), w)
os.close(w)
ready = os.read(r, 1)
_, status = os.waitpid(pid, 0)
print(ready.decode() or "-", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_daemon_writes_its_own_log_and_leaves_its_callers_streams_alone(tmp_path):
    """The caller's handlers and stdio objects are on descriptors the daemon closed: it must not
    close them (it died of "Bad file descriptor" before it served), nor write into whatever
    reuses their numbers; its log and output go to its own log file."""
    r = subprocess.run([sys.executable, "-c", DAEMON, str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split() == ["1", "0"], (r.stdout, r.stderr, (tmp_path / "daemon.log").read_text())
    log = (tmp_path / "daemon.log").read_text()
    assert "daemon logged" in log and "daemon printed" in log
    assert (tmp_path / "reused").read_text() == "only this"
    assert "daemon" not in (tmp_path / "caller.log").read_text() + (tmp_path / "caller.err").read_text()
