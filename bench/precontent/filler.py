"""A pre-content group and the user-space filler (an HSM daemon) that answers its events: it writes
the bytes an event's range needs into the file, or allows, denies or never answers (policy)."""
import errno, json, os, signal, time
from bench.precontent.harness import CHILDREN, GROUP_FDS, LOGS, MNT_EXT4, PG, content
from bench.precontent.uapi import FAN_ALLOW, FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC, FAN_DENY, FAN_DENY_ERRNO, FAN_EVENT_INFO_TYPE_RANGE, FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_MARK_INODE, FAN_MARK_MOUNT, FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS, INFO_HDR, META, O_LARGEFILE, RANGE, RESP, ename, fan_init, fan_mark


def close_group(g):
    os.close(g)
    GROUP_FDS.discard(g)


def new_group(extra=0, mark=('fs', MNT_EXT4), mask=FAN_PRE_ACCESS):
    g = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | extra, os.O_RDWR | O_LARGEFILE)
    GROUP_FDS.add(g)
    kind, path = mark
    fl = {'fs': FAN_MARK_FILESYSTEM, 'mount': FAN_MARK_MOUNT, 'inode': FAN_MARK_INODE}[kind]
    fan_mark(g, FAN_MARK_ADD | fl, mask, path)
    return g


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
