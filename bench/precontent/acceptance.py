"""1. Which fanotify_init flags and which marks, on which filesystems, this kernel accepts for
pre-content events."""
import os
from bench.precontent.harness import MNT_EXT4, MNT_TMPFS, ROOT, mk_sparse
from bench.precontent.uapi import FAN_ACCESS_PERM, FAN_CLASS_CONTENT, FAN_CLASS_NOTIF, FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC, FAN_EVENT_ON_CHILD, FAN_MARK_ADD, FAN_MARK_EVICTABLE, FAN_MARK_FILESYSTEM, FAN_MARK_IGNORE, FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_INODE, FAN_MARK_MOUNT, FAN_NONBLOCK, FAN_PRE_ACCESS, FAN_REPORT_DIR_FID, FAN_REPORT_FD_ERROR, FAN_REPORT_FID, FAN_REPORT_NAME, FAN_REPORT_PIDFD, FAN_REPORT_TID, FAN_UNLIMITED_MARKS, FAN_UNLIMITED_QUEUE, O_LARGEFILE, ename, fan_init, fan_mark


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
