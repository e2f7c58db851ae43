"""fanotify's user-space API, as include/uapi/linux/fanotify.h (Linux >= 6.14) spells it, through
ctypes: the constants, the event structures, fanotify_init and fanotify_mark."""
import ctypes, errno, os, struct


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
