"""fanotify pre-content events (FAN_PRE_ACCESS) as a lazy data path, against FUSE: which marks and
filesystems the kernel accepts, whether reads, mmaps, execve and dlopen see filled bytes, what
a denied event or a dead filler does to the reader, and the latency of a 512 KiB miss either way
(docs/benchmarks.md, "Misses: FUSE or fanotify pre-content").

Usage (as root, from the checkout; about 10 s):
  .venv/bin/python -m bench.precontent [--n 500]
  (internal) <python> -m bench.precontent fuse-server MNT SIZE direct|cached

Everything lives under $LAZYFS_PRECONTENT_DIR (default /tmp/lazyfs-precontent), on a loop-mounted
ext4 image it makes and removes. ctypes only (fusepy for the FUSE side). One module per part:
uapi (the kernel's constants and calls), harness (scratch space, bytes, child readers), filler
(the user-space daemon that answers events), then the three probes and __main__.
"""
