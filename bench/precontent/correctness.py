"""2. Whether reads, mmaps, execve and dlopen see filled bytes, and what a denied event or a dead
filler does to the reader."""
import ctypes, mmap, os, signal, subprocess, time
from bench.precontent.filler import brief, close_group, new_group, read_log, start_daemon
from bench.precontent.harness import CHILDREN, Child, MNT_EXT4, content, in_child, mk_sparse, now, stop
from bench.precontent.uapi import FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS, FAN_REPORT_FD_ERROR, ename


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
