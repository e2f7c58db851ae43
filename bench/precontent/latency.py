"""3. The latency of a 512 KiB miss served by the fanotify filler, and by a FUSE server (the
fallback data path), cold and warm."""
import errno, os, random, select, stat, statistics, subprocess, time
from bench.precontent.filler import close_group, new_group, read_log, start_daemon
from bench.precontent.harness import CHILDREN, Child, LOGS, MNT_EXT4, MNT_FUSE, MOUNTS, content, in_child, mk_sparse, sh, stop
from bench.precontent.uapi import FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_MARK_EVICTABLE, FAN_MARK_FILESYSTEM, FAN_MARK_FLUSH, FAN_MARK_IGNORE, FAN_MARK_INODE, FAN_MARK_MOUNT, FAN_PRE_ACCESS, O_LARGEFILE, ename, fan_init, fan_mark, libc


CH = 512 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        p = subprocess.Popen([pyexe, '-m', 'bench.precontent', 'fuse-server', MNT_FUSE, str(n * CH), mode],
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
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
