"""The probe's scratch space (a loop-mounted ext4 image and a tmpfs under $LAZYFS_PRECONTENT_DIR),
the deterministic bytes its files stand for, and readers run in child processes; everything it
started or mounted goes in cleanup()."""
import json, os, random, select, signal, subprocess, time


ROOT = os.environ.get('LAZYFS_PRECONTENT_DIR', '/tmp/lazyfs-precontent')
# ---------------------------------------------------------------- deterministic "image" bytes
PG = 4096
BL = 1 << 20
BASE2 = (lambda b: b + b)(random.Random(42).randbytes(BL))


def content(off, n):
    if n <= 0:
        return b''
    p0, p1 = off // PG, (off + n - 1) // PG
    b = b''.join([BASE2[(p * 40961) % BL:(p * 40961) % BL + PG] for p in range(p0, p1 + 1)])
    s = off - p0 * PG
    return b[s:s + n]

# ---------------------------------------------------------------- paths / setup / cleanup
EXT4_IMG = f'{ROOT}/ext4.img'
MNT_EXT4 = f'{ROOT}/mnt_ext4'
MNT_TMPFS = f'{ROOT}/mnt_tmpfs'
MNT_FUSE = f'{ROOT}/mnt_fuse'
LOGS = f'{ROOT}/logs'
CHILDREN = set()
GROUP_FDS = set()
MOUNTS = []


def sh(*a, check=True):
    return subprocess.run(list(a), check=check, capture_output=True, text=True)


def cleanup():
    for pid in list(CHILDREN):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        CHILDREN.discard(pid)
    for fd in list(GROUP_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
        GROUP_FDS.discard(fd)
    for m in reversed(MOUNTS):
        if os.path.ismount(m):
            r = sh('umount', m, check=False)
            if r.returncode:
                sh('umount', '-l', m, check=False)
    MOUNTS.clear()


def setup(n_chunks):
    for d in (MNT_EXT4, MNT_TMPFS, MNT_FUSE, LOGS):
        os.makedirs(d, exist_ok=True)
    for m in (MNT_FUSE, MNT_TMPFS, MNT_EXT4):
        if os.path.ismount(m):
            sh('umount', '-l', m, check=False)
    size_mb = max(400, (n_chunks * 512 * 1024 >> 20) + 150)
    if os.path.exists(EXT4_IMG):
        os.unlink(EXT4_IMG)
    with open(EXT4_IMG, 'wb') as f:
        f.truncate(size_mb << 20)
    sh('mkfs.ext4', '-q', '-F', EXT4_IMG)
    sh('mount', '-o', 'loop', EXT4_IMG, MNT_EXT4)
    MOUNTS.append(MNT_EXT4)
    sh('mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', MNT_TMPFS)
    MOUNTS.append(MNT_TMPFS)


def mk_sparse(path, size, mode=0o644):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    os.ftruncate(fd, size)
    os.close(fd)
    os.chmod(path, mode)
    return os.stat(path).st_ino

# ---------------------------------------------------------------- run a reader in a child process
class Child:
    def __init__(self, fn):
        self.r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.r)
            for g in GROUP_FDS:
                try:
                    os.close(g)
                except OSError:
                    pass
            try:
                res = fn()
            except BaseException as e:
                res = {'exception': repr(e)}
            data = json.dumps(res).encode()
            while data:
                data = data[os.write(w, data):]
            os._exit(0)
        os.close(w)
        CHILDREN.add(self.pid)

    def collect(self, timeout=30):
        buf = b''
        end = time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                stop(self.pid)
                os.close(self.r)
                return {'timeout': True}
            rl, _, _ = select.select([self.r], [], [], left)
            if rl:
                d = os.read(self.r, 1 << 20)
                if not d:
                    break
                buf += d
        os.close(self.r)
        os.waitpid(self.pid, 0)
        CHILDREN.discard(self.pid)
        return json.loads(buf) if buf else {'no_result': True}


def in_child(fn, timeout=30):
    return Child(fn).collect(timeout)


def now():
    return time.perf_counter_ns()



def stop(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    CHILDREN.discard(pid)
