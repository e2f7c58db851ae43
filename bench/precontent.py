#!/usr/bin/env python3
"""fanotify pre-content events (FAN_PRE_ACCESS) as a lazy data path, against FUSE: which marks and
filesystems the kernel accepts, whether reads, mmaps, execve and dlopen see filled bytes, what
a denied event or a dead filler does to the reader, and the latency of a 512 KiB miss either way
(docs/benchmarks.md, "Misses: FUSE or fanotify pre-content").

Usage (as root; about 10 s):
  .venv/bin/python bench/precontent.py [--n 500]
  (internal) <python> precontent.py fuse-server MNT SIZE direct|cached

Everything lives under $LAZYFS_PRECONTENT_DIR (default /tmp/lazyfs-precontent), on a loop-mounted
ext4 image it makes and removes. ctypes only (fusepy for the FUSE side). Constants are those of
include/uapi/linux/fanotify.h (Linux >= 6.14).
"""
import ctypes, ctypes.util, errno, json, mmap, os, random, select, signal, stat
import statistics, struct, subprocess, sys, time, atexit

ROOT = os.environ.get('LAZYFS_PRECONTENT_DIR', '/tmp/lazyfs-precontent')
# ---------------------------------------------------------------- uapi constants
FAN_ACCESS = 0x1
FAN_OPEN_PERM = 0x10000
FAN_ACCESS_PERM = 0x20000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_PRE_ACCESS = 0x100000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_CLASS_PRE_CONTENT = 0x8
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_PIDFD = 0x80
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_FD_ERROR = 0x2000

FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_IGNORED_SURV_MODIFY = 0x40
FAN_MARK_FLUSH = 0x80
FAN_MARK_EVICTABLE = 0x200
FAN_MARK_IGNORE = 0x400
FAN_MARK_INODE = 0x0
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_RANGE = 6
FAN_ALLOW = 0x1
FAN_DENY = 0x2
def FAN_DENY_ERRNO(e): return FAN_DENY | ((e & 0xff) << 24)

O_LARGEFILE = 0o100000  # x86_64
AT_FDCWD = -100
META = struct.Struct('=IBBHQii')     # fanotify_event_metadata, 24 bytes
INFO_HDR = struct.Struct('=BBH')
RANGE = struct.Struct('=BBHIQQ')      # fanotify_event_info_range, 24 bytes
RESP = struct.Struct('=iI')
assert META.size == 24 and RANGE.size == 24

libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_init.restype = ctypes.c_int
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
libc.fanotify_mark.restype = ctypes.c_int
libc.posix_fadvise.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int]


def fan_init(flags, evf):
    r = libc.fanotify_init(flags, evf)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def fan_mark(fd, flags, mask, path):
    r = libc.fanotify_mark(fd, flags, mask, AT_FDCWD, path.encode() if path else None)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def ename(e):
    return errno.errorcode.get(e, str(e))

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

# ---------------------------------------------------------------- the user-space "HSM" daemon
def daemon_main(fan_fd, policy, logpath, sources):
    """policy: fill | allow | deny | deny_eio | hang.  sources: ino -> bytes (else pattern)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log = open(logpath, 'w', buffering=1)
    filled = {}
    while True:
        try:
            buf = os.read(fan_fd, 65536)
        except OSError as e:
            log.write(json.dumps({'read_error': ename(e.errno), 't': time.perf_counter_ns()}) + '\n')
            if e.errno in (errno.EINTR, errno.EAGAIN):
                continue
            continue
        t_recv = time.perf_counter_ns()
        pos = 0
        while pos + META.size <= len(buf):
            ev_len, vers, _, mlen, mask, fd, pid = META.unpack_from(buf, pos)
            rec = {'t_recv': t_recv, 'mask': hex(mask), 'fd': fd, 'pid': pid}
            p = pos + mlen
            while p + INFO_HDR.size <= pos + ev_len:
                itype, _, ilen = INFO_HDR.unpack_from(buf, p)
                if itype == FAN_EVENT_INFO_TYPE_RANGE:
                    _, _, _, _, off, cnt = RANGE.unpack_from(buf, p)
                    rec['off'], rec['cnt'] = off, cnt
                else:
                    rec.setdefault('info', []).append(itype)
                if ilen == 0:
                    break
                p += ilen
            pos += ev_len
            if fd < 0:
                log.write(json.dumps(rec) + '\n')
                continue
            try:
                st = os.fstat(fd)
                rec['ino'] = st.st_ino
                size = st.st_size
                if policy == 'fill':
                    src = sources.get(st.st_ino)
                    if mask & FAN_OPEN_EXEC_PERM:   # fill the whole binary before exec denies writes
                        off, cnt = 0, size
                    elif 'off' in rec:
                        off, cnt = rec['off'], rec['cnt']
                    else:
                        off, cnt = 0, 0
                    bm = filled.setdefault(st.st_ino, bytearray((size + PG - 1) // PG))
                    p0, p1 = off // PG, min((off + cnt + PG - 1) // PG, len(bm))
                    nb = 0
                    q = p0
                    while q < p1:
                        if bm[q]:
                            q += 1
                            continue
                        r = q
                        while r < p1 and not bm[r]:
                            r += 1
                        a, b = q * PG, min(r * PG, size)
                        data = src[a:b] if src is not None else content(a, b - a)
                        os.pwrite(fd, data, a)
                        nb += b - a
                        bm[q:r] = b'\x01' * (r - q)
                        q = r
                    rec['filled'] = nb
                    resp = FAN_ALLOW
                elif policy == 'allow':
                    resp = FAN_ALLOW
                elif policy == 'deny':
                    resp = FAN_DENY
                elif policy == 'deny_eio':
                    resp = FAN_DENY_ERRNO(errno.EIO)
                else:  # hang: never answer
                    log.write(json.dumps(rec) + '\n')
                    continue
            except OSError as e:
                rec['fill_error'] = ename(e.errno)
                resp = FAN_ALLOW if policy == 'fill' else FAN_DENY
            try:
                os.write(fan_fd, RESP.pack(fd, resp))
            except OSError as e:
                rec['resp_error'] = ename(e.errno)
            rec['t_resp'] = time.perf_counter_ns()
            os.close(fd)
            log.write(json.dumps(rec) + '\n')


def start_daemon(fan_fd, policy, tag, sources=None):
    logpath = f'{LOGS}/{tag}.jsonl'
    pid = os.fork()
    if pid == 0:
        try:
            for g in GROUP_FDS:
                if g != fan_fd:
                    os.close(g)
            daemon_main(fan_fd, policy, logpath, sources or {})
        finally:
            os._exit(0)
    CHILDREN.add(pid)
    time.sleep(0.05)
    return pid, logpath


def stop(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    CHILDREN.discard(pid)


def read_log(path):
    time.sleep(0.1)   # daemon logs after answering: let the last line land
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def brief(evs, t0=0):
    return [{k: v for k, v in e.items() if k in ('mask', 'off', 'cnt', 'filled', 'fill_error', 'resp_error',
                                                  'read_error', 'fd', 'info')} for e in evs]

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

# ---------------------------------------------------------------- 1. acceptance matrix
def acceptance(res):
    f_ext4 = f'{MNT_EXT4}/accept.bin'
    f_tmp = f'{MNT_TMPFS}/accept.bin'
    f_root = f'{ROOT}/accept_rootfs.bin'
    for p in (f_ext4, f_tmp, f_root):
        mk_sparse(p, 1 << 20)
    os.makedirs(f'{MNT_EXT4}/d', exist_ok=True)
    RO = os.O_RDONLY | O_LARGEFILE
    inits = [
        ('NOTIF|CLOEXEC', FAN_CLASS_NOTIF | FAN_CLOEXEC, RO),
        ('CONTENT|CLOEXEC', FAN_CLASS_CONTENT | FAN_CLOEXEC, RO),
        ('PRE_CONTENT|CLOEXEC', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, RO),
        ('PRE_CONTENT|CLOEXEC evf=O_RDWR', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDWR | O_LARGEFILE),
        ('PRE_CONTENT|NONBLOCK', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, RO),
        ('PRE_CONTENT|UNLIMITED_QUEUE|UNLIMITED_MARKS', FAN_CLASS_PRE_CONTENT | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS, RO),
        ('PRE_CONTENT|REPORT_FID', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_REPORT_FID, RO),
        ('PRE_CONTENT|REPORT_DFID_NAME|FID', FAN_CLASS_PRE_CONTENT | FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME, RO),
        ('PRE_CONTENT|REPORT_FD_ERROR', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_REPORT_FD_ERROR, RO),
        ('PRE_CONTENT|REPORT_PIDFD', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_REPORT_PIDFD, RO),
        ('PRE_CONTENT|REPORT_TID', FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_REPORT_TID, RO),
    ]
    marks = [
        ('ext4 inode(file)', FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS, f_ext4),
        ('ext4 inode(dir)', FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS, f'{MNT_EXT4}/d'),
        ('ext4 inode(dir)+ON_CHILD', FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS | FAN_EVENT_ON_CHILD, f'{MNT_EXT4}/d'),
        ('ext4 MOUNT', FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_PRE_ACCESS, MNT_EXT4),
        ('ext4 FILESYSTEM', FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, MNT_EXT4),
        ('rootfs ext4 inode(file)', FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS, f_root),
        ('tmpfs inode(file)', FAN_MARK_ADD | FAN_MARK_INODE, FAN_PRE_ACCESS, f_tmp),
        ('tmpfs MOUNT', FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_PRE_ACCESS, MNT_TMPFS),
        ('tmpfs FILESYSTEM', FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, MNT_TMPFS),
        ('ext4 inode ACCESS_PERM|PRE_ACCESS', FAN_MARK_ADD, FAN_PRE_ACCESS | FAN_ACCESS_PERM, f_ext4),
        ('ext4 inode IGNORE(PRE_ACCESS)', FAN_MARK_ADD | FAN_MARK_IGNORE, FAN_PRE_ACCESS, f_ext4),
        ('ext4 inode IGNORE|EVICTABLE', FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_EVICTABLE, FAN_PRE_ACCESS, f_ext4),
        ('ext4 inode IGNORED_MASK(legacy)', FAN_MARK_ADD | FAN_MARK_IGNORED_MASK, FAN_PRE_ACCESS, f_ext4),
        ('ext4 MOUNT IGNORE_SURV', FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY, FAN_PRE_ACCESS, MNT_EXT4),
    ]
    table = []
    for iname, fl, evf in inits:
        row = {'init': iname}
        try:
            g = fan_init(fl, evf)
        except OSError as e:
            row['fanotify_init'] = ename(e.errno)
            table.append(row)
            continue
        row['fanotify_init'] = 'ok'
        os.close(g)
        for mname, mfl, mask, path in marks:
            g = fan_init(fl, evf)   # fresh group per mark: no cross-talk, nothing left blocking
            try:
                fan_mark(g, mfl, mask, path)
                row[mname] = 'ok'
            except OSError as e:
                row[mname] = ename(e.errno)
            finally:
                os.close(g)
        table.append(row)
    res['acceptance'] = table
    # FUSE filesystem acceptance is added later (needs a fuse mount)


def new_group(extra=0, mark=('fs', MNT_EXT4), mask=FAN_PRE_ACCESS):
    g = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | extra, os.O_RDWR | O_LARGEFILE)
    GROUP_FDS.add(g)
    kind, path = mark
    fl = {'fs': FAN_MARK_FILESYSTEM, 'mount': FAN_MARK_MOUNT, 'inode': FAN_MARK_INODE}[kind]
    fan_mark(g, FAN_MARK_ADD | fl, mask, path)
    return g


def close_group(g):
    os.close(g)
    GROUP_FDS.discard(g)

# ---------------------------------------------------------------- 2. correctness
def correctness(res):
    M = 1 << 20
    fa = f'{MNT_EXT4}/a.bin'; mk_sparse(fa, 8 * M)
    fb1 = f'{MNT_EXT4}/b1.bin'; mk_sparse(fb1, 8 * M)
    fb2 = f'{MNT_EXT4}/b2.bin'; mk_sparse(fb2, 8 * M)
    fb5 = f'{MNT_EXT4}/b5.bin'; mk_sparse(fb5, 8 * M)
    fd1 = f'{MNT_EXT4}/d1.bin'; mk_sparse(fd1, 8 * M)
    fd2 = f'{MNT_EXT4}/d2.bin'; mk_sparse(fd2, 8 * M)
    libsrc = os.path.realpath('/lib/x86_64-linux-gnu/libz.so.1')
    libz = f'{MNT_EXT4}/libz.so.1'
    libbytes = open(libsrc, 'rb').read()
    ino_libz = mk_sparse(libz, len(libbytes))
    echo_src = '/bin/echo'
    echobytes = open(echo_src, 'rb').read()
    echo1 = f'{MNT_EXT4}/echo1'; ino_e1 = mk_sparse(echo1, len(echobytes), 0o755)
    echo2 = f'{MNT_EXT4}/echo2'; ino_e2 = mk_sparse(echo2, len(echobytes), 0o755)
    sources = {ino_libz: libbytes, ino_e1: echobytes, ino_e2: echobytes}
    out = {}

    # b5: open BEFORE any pre-content mark exists, then mark + fill daemon, then read
    pre_fd = os.open(fb5, os.O_RDONLY)

    g = new_group()
    dpid, dlog = start_daemon(g, 'fill', 'a_fill', sources)

    # (a) read() of a hole
    def ra():
        fd = os.open(fa, os.O_RDONLY)
        t0 = now(); d = os.pread(fd, 512 * 1024, 1 * M); t1 = now()
        d2 = os.pread(fd, 100, 3 * M + 5)   # small unaligned read
        d3 = os.pread(fd, 512 * 1024, 1 * M)  # re-read of filled range
        os.close(fd)
        return {'ok_512k': d == content(M, 512 * 1024), 'zeros': d.count(0) == len(d), 'us': (t1 - t0) / 1e3,
                'ok_small': d2 == content(3 * M + 5, 100), 'ok_reread': d3 == d}
    r = in_child(ra)
    r['events'] = brief(read_log(dlog))
    out['a_read_hole'] = r

    # b5 continued
    d = os.pread(pre_fd, 4096, 2 * M)
    os.close(pre_fd)
    out['b5_fd_opened_before_mark'] = {'all_zero': d.count(0) == 4096, 'events_total_so_far': len(read_log(dlog))}

    # (b2) mmap with the fill daemon: does the mmap() call itself fire, with which range?
    def rb(path, length, offset, flags, prot, touch):
        def f():
            fd = os.open(path, os.O_RDONLY)
            t0 = now()
            try:
                m = mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)
            except OSError as e:
                return {'mmap_errno': ename(e.errno)}
            t1 = now()
            got = m[touch:touch + 64]
            t2 = now()
            ok = got == content(offset + touch, 64)
            m.close(); os.close(fd)
            return {'t_mmap': [t0, t1], 't_fault': [t1, t2], 'data_ok': ok, 'zeros': got == bytes(64)}
        return f

    def attribute(r, evs):
        if 't_mmap' not in r:
            return
        r['events_during_mmap'] = brief([e for e in evs if r['t_mmap'][0] <= e['t_recv'] <= r['t_mmap'][1]])
        r['events_during_fault'] = brief([e for e in evs if r['t_fault'][0] <= e['t_recv'] <= r['t_fault'][1]])
        del r['t_mmap'], r['t_fault']
    n0 = len(read_log(dlog))
    r = in_child(rb(fb2, 1 * M, 4 * M, mmap.MAP_SHARED, mmap.PROT_READ, 300 * 1024))
    attribute(r, read_log(dlog)[n0:])
    out['b2_mmap_shared_fill_daemon(off=4MiB,len=1MiB)'] = r
    n0 = len(read_log(dlog))
    r = in_child(rb(fb2, 2 * M, 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC, 1500 * 1024))
    attribute(r, read_log(dlog)[n0:])
    out['b3_mmap_private_exec_fill_daemon(off=0,len=2MiB)'] = r

    # (c) dlopen of a lazily filled shared library + execve of a lazily filled binary
    n0 = len(read_log(dlog))
    def rc():
        lib = ctypes.CDLL(libz)
        lib.zlibVersion.restype = ctypes.c_char_p
        return {'zlibVersion': lib.zlibVersion().decode()}
    r = in_child(rc)
    evs = read_log(dlog)[n0:]
    r['events'] = brief(evs)
    r['bytes_filled'] = sum(e.get('filled', 0) for e in evs)
    r['file_size'] = len(libbytes)
    out['c_dlopen_libz'] = r
    n0 = len(read_log(dlog))
    def rexec(path):
        def f():
            p = subprocess.run([path, 'hello-from-lazy-binary'], capture_output=True, timeout=10)
            return {'rc': p.returncode, 'stdout': p.stdout.decode(errors='replace').strip(),
                    'stderr': p.stderr.decode(errors='replace').strip()[:200]}
        return f
    r = in_child(rexec(echo1))
    evs = read_log(dlog)[n0:]
    r['events'] = brief(evs)
    r['bytes_filled'] = sum(e.get('filled', 0) for e in evs)
    r['file_size'] = len(echobytes)
    out['c_execve_echo(PRE_ACCESS only)'] = r
    stop(dpid)
    close_group(g)

    # (c') exec with FAN_OPEN_EXEC_PERM in the mask: daemon fills whole binary at open_exec time
    g = new_group(mask=FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM)
    dpid, dlog = start_daemon(g, 'fill', 'c_exec2', sources)
    r = in_child(rexec(echo2))
    evs = read_log(dlog)
    r['events'] = brief(evs)
    r['bytes_filled'] = sum(e.get('filled', 0) for e in evs)
    out['c_execve_echo(PRE_ACCESS|OPEN_EXEC_PERM, fill all on open_exec)'] = r
    stop(dpid)
    close_group(g)

    # (c'') exec with FAN_REPORT_FD_ERROR to see the event-fd error
    echo3 = f'{MNT_EXT4}/echo1'  # echo1 may be partly filled; use a fresh one
    # fresh file must be created with no group present
    echo3 = f'{MNT_EXT4}/echo3'; ino_e3 = mk_sparse(echo3, len(echobytes), 0o755)
    sources[ino_e3] = echobytes
    g = new_group(extra=FAN_REPORT_FD_ERROR)
    dpid, dlog = start_daemon(g, 'fill', 'c_exec3', sources)
    r = in_child(rexec(echo3))
    r['events'] = brief(read_log(dlog))
    out['c_execve_echo(REPORT_FD_ERROR)'] = r
    stop(dpid)
    close_group(g)

    # (b1) mmap + page fault with a daemon that ALLOWs without filling: does the fault itself fire?
    g = new_group()
    dpid, dlog = start_daemon(g, 'allow', 'b1_allow')
    r = in_child(rb(fb1, 8 * M, 0, mmap.MAP_SHARED, mmap.PROT_READ, 5 * M + 123))
    attribute(r, read_log(dlog))
    out['b1_mmap_allow_nofill_daemon(fault on hole page)'] = r
    stop(dpid)

    # (d) deny, deny with errno
    for pol in ('deny', 'deny_eio'):
        dpid, dlog = start_daemon(g, pol, f'd_{pol}')
        def rd():
            fd = os.open(fd1, os.O_RDONLY)
            o = {}
            try:
                os.pread(fd, 4096, 0); o['read'] = 'succeeded'
            except OSError as e:
                o['read_errno'] = ename(e.errno)
            try:
                m = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                o['mmap'] = 'succeeded'; m.close()
            except OSError as e:
                o['mmap_errno'] = ename(e.errno)
            os.close(fd)
            return o
        r = in_child(rd)
        r['events'] = brief(read_log(dlog))
        out[f'd_{pol}'] = r
        stop(dpid)

    # (d) daemon dies (SIGKILL) while an event is pending; parent's copy of group fd closed first
    dpid, dlog = start_daemon(g, 'hang', 'd_die')
    close_group(g)   # only the daemon holds the group now
    def rdie():
        fd = os.open(fd2, os.O_RDONLY)
        t0 = now()
        try:
            d = os.pread(fd, 4096, 0)
            o = {'read': 'returned', 'len': len(d), 'all_zero': d == bytes(len(d))}
        except OSError as e:
            o = {'read_errno': ename(e.errno)}
        o['blocked_ms'] = (now() - t0) / 1e6
        os.close(fd)
        return o
    ch = Child(rdie)
    time.sleep(1.0)
    evs_before = read_log(dlog)
    stop(dpid)
    r = ch.collect(10)
    r['daemon_killed_after_ms'] = 1000
    r['events_seen_by_daemon'] = brief(evs_before)
    out['d_daemon_killed_with_pending_event'] = r

    # (d) reader blocked by a hung daemon: is the reader killable?
    g = new_group()
    dpid, dlog = start_daemon(g, 'hang', 'd_hang_kill_reader')
    def rhang():
        fd = os.open(fd2, os.O_RDONLY)   # d2 now has zeros only in the page cache? use other offset
        os.pread(fd, 4096, 6 * M)
        return {'returned': True}
    ch = Child(rhang)
    time.sleep(0.5)
    t0 = time.time()
    os.kill(ch.pid, signal.SIGKILL)
    os.waitpid(ch.pid, 0)
    CHILDREN.discard(ch.pid)
    os.close(ch.r)
    out['d_reader_blocked_sigkill'] = {'reader_reaped_after_ms': round((time.time() - t0) * 1e3, 2),
                                        'events': brief(read_log(dlog))}
    # SIGTERM (non-fatal-by-handler? default action kills) vs SIGINT-with-handler: interruptible?
    def rhang2():
        signal.signal(signal.SIGUSR1, lambda *a: None)
        fd = os.open(fd2, os.O_RDONLY)
        t0 = now()
        try:
            os.pread(fd, 4096, 7 * M)
            return {'returned': True, 'ms': (now() - t0) / 1e6}
        except OSError as e:
            return {'errno': ename(e.errno), 'ms': (now() - t0) / 1e6}
    ch = Child(rhang2)
    time.sleep(0.5)
    os.kill(ch.pid, signal.SIGUSR1)
    r = ch.collect(2)
    out['d_reader_blocked_SIGUSR1_with_handler'] = r if not r.get('timeout') else {'still_blocked_after_2s': True}
    stop(dpid)
    close_group(g)
    res['correctness'] = out

# ---------------------------------------------------------------- 3. latency
CH = 512 * 1024


def pct(xs):
    xs = sorted(xs)
    return {'median_us': round(statistics.median(xs), 1), 'p90_us': round(xs[int(0.9 * (len(xs) - 1))], 1),
            'min_us': round(xs[0], 1), 'max_us': round(xs[-1], 1), 'n': len(xs)}


def timed_pass(path, order, fd=None, verify_every=25):
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
        libc.posix_fadvise(fd, 0, 0, 1)   # POSIX_FADV_RANDOM: no readahead help
    lat = []
    bad = 0
    for k, i in enumerate(order):
        t0 = time.perf_counter_ns()
        d = os.pread(fd, CH, i * CH)
        lat.append((time.perf_counter_ns() - t0) / 1e3)
        if k % verify_every == 0 and d != content(i * CH, CH):
            bad += 1
    if own:
        os.close(fd)
    return lat, bad


def latency_fanotify(res, n):
    path = f'{MNT_EXT4}/lat.bin'
    mk_sparse(path, n * CH)
    order = list(range(n)); random.Random(7).shuffle(order)
    out = {}
    g = new_group()
    dpid, dlog = start_daemon(g, 'fill', 'lat')
    rp, wp = os.pipe(); rc, wc = os.pipe()   # reader->parent, parent->reader

    def reader():
        fd = os.open(path, os.O_RDONLY)
        libc.posix_fadvise(fd, 0, 0, 1)
        o = {}
        cold, bad = timed_pass(path, order, fd); o['cold'] = (cold, bad)
        warm, bad = timed_pass(path, order, fd); o['warm_events_firing'] = (warm, bad)
        os.write(wp, b'1'); os.read(rc, 1)     # parent adds an inode IGNORE mark
        w2, bad = timed_pass(path, order, fd); o['warm_ignore_same_fd'] = (w2, bad)
        w3, bad = timed_pass(path, order); o['warm_ignore_new_fd'] = (w3, bad)
        os.write(wp, b'2'); os.read(rc, 1)     # parent flushes all marks
        w4, bad = timed_pass(path, order, fd); o['warm_after_flush_same_fd'] = (w4, bad)
        w5, bad = timed_pass(path, order); o['warm_after_flush_new_fd(no fanotify)'] = (w5, bad)
        os.close(fd)
        return o
    ch = Child(reader)
    os.close(wp); os.close(rc)
    def wait_for(tok):
        r, _, _ = select.select([rp], [], [], 120)
        assert r and os.read(rp, 1) == tok
    wait_for(b'1')
    n_before_ignore = len(read_log(dlog))
    try:
        fan_mark(g, FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_EVICTABLE, FAN_PRE_ACCESS, path)
        out['ignore_mark'] = 'FAN_MARK_IGNORE|FAN_MARK_EVICTABLE inode mark added'
    except OSError as e:
        out['ignore_mark'] = f'IGNORE|EVICTABLE failed {ename(e.errno)}'
        try:
            fan_mark(g, FAN_MARK_ADD | FAN_MARK_IGNORE, FAN_PRE_ACCESS, path)
            out['ignore_mark'] += '; FAN_MARK_IGNORE inode mark added'
        except OSError as e2:
            out['ignore_mark'] += f'; IGNORE failed {ename(e2.errno)}'
    os.write(wc, b'g')
    wait_for(b'2')
    n_after_ignore = len(read_log(dlog))
    fan_mark(g, FAN_MARK_FLUSH | FAN_MARK_FILESYSTEM, 0, MNT_EXT4)
    fan_mark(g, FAN_MARK_FLUSH, 0, None)
    os.write(wc, b'g')
    r = ch.collect(300)
    os.close(rp); os.close(wc)
    evs = read_log(dlog)
    stop(dpid); close_group(g)
    if 'exception' in r or r.get('timeout'):
        out['error'] = r
        res['latency_fanotify'] = out
        return
    for k, (lat, bad) in r.items():
        out[k] = dict(pct(lat), content_mismatches=bad)
    cold_ev = evs[:n]
    out['events'] = {'total': len(evs), 'during_cold': n, 'during_warm_events_firing': n_before_ignore - n,
                     'during_ignore_passes': n_after_ignore - n_before_ignore,
                     'during_flush_passes': len(evs) - n_after_ignore}
    out['daemon_side_cold_us(recv->resp)'] = pct([(e['t_resp'] - e['t_recv']) / 1e3 for e in cold_ev if 't_resp' in e])
    out['cold_event_ranges_sample'] = [(e.get('off'), e.get('cnt')) for e in cold_ev[:3]]
    # reference: same (now populated) file read from the loop-backed ext4 with cache dropped for this file
    def ref():
        fd = os.open(path, os.O_RDONLY)
        libc.posix_fadvise(fd, 0, 0, 4)   # DONTNEED
        libc.posix_fadvise(fd, 0, 0, 1)
        lat, bad = timed_pass(path, order, fd)
        os.close(fd)
        return [lat, bad]
    os.sync()
    lat, bad = in_child(ref, 120)
    out['reference_ext4_uncached_no_fanotify'] = dict(pct(lat), content_mismatches=bad)
    res['latency_fanotify'] = out

# ---------------------------------------------------------------- FUSE side
def fuse_server(mnt, size, mode):
    import warnings; warnings.simplefilter('ignore')
    import fuse

    class Ops(fuse.Operations):
        use_ns = True
        def getattr(self, path, fh=None):
            if path == '/':
                return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
            if path == '/img':
                return dict(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size)
            raise fuse.FuseOSError(errno.ENOENT)
        def readdir(self, path, fh):
            return ['.', '..', 'img']
        def open(self, path, flags):
            return 0
        def read(self, path, sz, off, fh):
            return content(off, max(0, min(sz, size - off)))
    opts = dict(foreground=True, nothreads=False, ro=True)
    if mode == 'direct':
        opts['direct_io'] = True
    fuse.FUSE(Ops(), mnt, **opts)


def latency_fuse(res, n, pyexe):
    out = {}
    order = list(range(n)); random.Random(7).shuffle(order)
    for mode in ('cached', 'direct'):
        log = open(f'{LOGS}/fuse_{mode}.log', 'w')
        p = subprocess.Popen([pyexe, os.path.abspath(__file__), 'fuse-server', MNT_FUSE, str(n * CH), mode],
                             stdout=log, stderr=subprocess.STDOUT)
        CHILDREN.add(p.pid)
        MOUNTS.append(MNT_FUSE)
        try:
            for _ in range(100):
                if os.path.ismount(MNT_FUSE):
                    break
                time.sleep(0.1)
            else:
                out[mode] = {'error': 'mount did not appear', 'log': open(f'{LOGS}/fuse_{mode}.log').read()[-500:]}
                continue
            img = f'{MNT_FUSE}/img'
            if mode == 'cached' and 'fuse_accept' not in res:
                row = {}
                for nm, fl in (('inode', FAN_MARK_INODE), ('mount', FAN_MARK_MOUNT), ('filesystem', FAN_MARK_FILESYSTEM)):
                    g = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDONLY | O_LARGEFILE)
                    try:
                        fan_mark(g, FAN_MARK_ADD | fl, FAN_PRE_ACCESS, img if fl == FAN_MARK_INODE else MNT_FUSE)
                        row[nm] = 'ok'
                    except OSError as e:
                        row[nm] = ename(e.errno)
                    os.close(g)
                res['fuse_accept'] = row
            def reader():
                fd = os.open(img, os.O_RDONLY)
                libc.posix_fadvise(fd, 0, 0, 1)
                cold, bad = timed_pass(img, order, fd)
                warm, bad2 = timed_pass(img, order, fd)
                os.close(fd)
                return [cold, bad, warm, bad2]
            r = in_child(reader, 300)
            if isinstance(r, dict):
                out[mode] = r
            else:
                out[mode] = {'cold': dict(pct(r[0]), content_mismatches=r[1]),
                             'second_pass_same_fd': dict(pct(r[2]), content_mismatches=r[3])}
        finally:
            sh('umount', MNT_FUSE, check=False)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill(); p.wait()
            CHILDREN.discard(p.pid)
            if os.path.ismount(MNT_FUSE):
                sh('umount', '-l', MNT_FUSE, check=False)
            MOUNTS.remove(MNT_FUSE)
    res['latency_fuse'] = out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == 'fuse-server':
        fuse_server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=500)
    ap.add_argument('--fuse-python', default=sys.executable)
    ap.add_argument('--skip', default='', help='comma list: accept,correct,latfan,latfuse')
    ap.add_argument('--out', default=f'{ROOT}/results.json')
    a = ap.parse_args()
    skip = set(a.skip.split(',')) if a.skip else set()
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *x: sys.exit(1))
    res = {'kernel': os.uname().release, 'fs_under_test': f'ext4 (loop-mounted image in {ROOT})'}
    setup(a.n)
    steps = [('accept', lambda: acceptance(res)), ('correct', lambda: correctness(res)),
             ('latfan', lambda: latency_fanotify(res, a.n)), ('latfuse', lambda: latency_fuse(res, a.n, a.fuse_python))]
    for name, fn in steps:
        if name in skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception:
            import traceback
            res[f'{name}_error'] = traceback.format_exc()
        res.setdefault('step_seconds', {})[name] = round(time.time() - t0, 1)
        with open(a.out, 'w') as f:
            json.dump(res, f, indent=1)
    cleanup()
    print(json.dumps(res, indent=1))


if __name__ == '__main__':
    main()
