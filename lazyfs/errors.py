"""The one exception tree of lazyfs.

Every error a user can trigger is a ``LazyfsError``; the CLI prints ``str(err)`` as one line and exits
with ``err.exit_code``. Errors about a specific object carry its digest so logs and callers can name it.
"""
from __future__ import annotations


class LazyfsError(Exception):
    """Base of every error lazyfs raises on purpose."""

    exit_code = 1


# --- format: bytes that do not follow docs/format.md -------------------------------------------

class FormatError(LazyfsError):
    """Encoded data (block, manifest, reference) is malformed."""


class ManifestFormatError(FormatError):
    pass


class KernelLayoutUnsupported(FormatError):
    """The image's tree has something the kernel's EROFS + overlayfs layout cannot express; such an
    image is served by the FUSE path instead."""


class BlockFormatError(FormatError):
    def __init__(self, message: str, digest: str | None = None):
        super().__init__(message if digest is None else f"block {digest}: {message}")
        self.digest = digest


class InvalidReference(FormatError):
    """An image reference (NAME:TAG or digest) is not valid."""


# --- integrity: bytes that do not hash to their name --------------------------------------------

class IntegrityError(LazyfsError):
    def __init__(self, message: str, digest: str | None = None):
        super().__init__(message)
        self.digest = digest


class DigestMismatch(IntegrityError):
    def __init__(self, expected: str, actual: str, what: str = "block"):
        super().__init__(f"{what} {expected}: content hashes to {actual}", expected)
        self.actual = actual


# An answer of wrong bytes: bytes that do not hash to their name, or that do not decode at all.
# Asked again, the same source gives the same bytes (a reader counts it, and asks elsewhere).
WRONG_BYTES = (IntegrityError, FormatError)


# --- stores ------------------------------------------------------------------------------------

class StoreError(LazyfsError):
    pass


class NotFound(StoreError):
    exit_code = 2

    def __init__(self, message: str, digest: str | None = None):
        super().__init__(message)
        self.digest = digest


class BlockNotFound(NotFound):
    def __init__(self, digest: str):
        super().__init__(f"block {digest} not found in store", digest)


class ManifestNotFound(NotFound):
    def __init__(self, digest: str):
        super().__init__(f"manifest {digest} not found in store", digest)


class TagNotFound(NotFound):
    def __init__(self, ref: str, where: str | None = None):
        super().__init__(f"image {ref} not found in store{f' {where}' if where else ''} "
                         "(see `lazyfs images`)")
        self.ref = ref


class StoreUnavailable(StoreError):
    """The store cannot be reached or written (I/O error, disk full, server down)."""


class StoreUnreachable(StoreUnavailable):
    """No answer at all: the connection refused, reset or timed out."""


class NotCached(StoreUnavailable):
    """A cache-only request (Cache-Control: only-if-cached) a cache server could not answer."""


class StoreAuthError(StoreUnavailable):
    """A cache server refused our token (or wanted one)."""


# --- image sources (build input) ---------------------------------------------------------------

class ImageSourceError(LazyfsError):
    """The build input is not a readable container image."""


class NotAnImage(ImageSourceError):
    pass


class UnsupportedMediaType(ImageSourceError):
    pass


class UnsupportedTransport(ImageSourceError):
    """A source spelled with a transport lazyfs does not read (``docker://``, ``containers-storage:``)."""


class LayerDigestMismatch(ImageSourceError, IntegrityError):
    def __init__(self, what: str, expected: str, actual: str):
        LazyfsError.__init__(self, f"{what}: content hashes to {actual}, image says {expected}")
        self.digest = expected
        self.actual = actual


class UnsafeEntry(ImageSourceError):
    """A layer entry that would escape or corrupt the image tree (``../``, absolute, link outside)."""

    def __init__(self, layer: str, name: str, why: str):
        super().__init__(f"layer {layer}: entry {name!r}: {why}")
        self.layer = layer
        self.name = name


class LimitExceeded(ImageSourceError):
    pass


class BlobSizeMismatch(ImageSourceError, IntegrityError):
    """A blob whose size is not the one its descriptor declares. The digest would catch a changed
    blob only once it is read whole; the size is what bounds the read, so a mismatch is refused
    as soon as it shows (OCI image spec, descriptor ``size``)."""

    def __init__(self, what: str, digest: str, declared: int, actual: str):
        LazyfsError.__init__(self, f"{what} {digest}: {actual}, its descriptor says {declared} bytes")
        self.digest = digest
        self.declared = declared


class BuildOptionError(LazyfsError):
    """A build option outside its range (``--chunk-size``), refused before anything is read."""

    exit_code = 2  # a usage error, as click reports its own


class PlatformNotFound(NotAnImage):
    """An image index has no image for the platform asked for; the message lists what it has."""


class RegistryError(ImageSourceError):
    """A registry (``docker://``) could not be reached or answered with an error; ``digest`` names
    the blob or manifest it was reading, when there was one."""

    def __init__(self, message: str, digest: str | None = None):
        super().__init__(message)
        self.digest = digest


class DownloadStalled(RegistryError):
    """A download that stopped making progress: no byte for the stall timeout, or fewer bytes
    than the minimum rate over a window (docs/registry.md, "Slow and stalled downloads")."""


class RegistryAuthError(RegistryError):
    """A registry refused us (HTTP 401/403): missing, wrong or insufficient credentials."""


# --- mounting and running ----------------------------------------------------------------------

class MountError(LazyfsError):
    pass


class LargerThanCache(LazyfsError):
    """A file larger than the whole node cache (its cap, --cache-size): making room for it would
    evict everything and still pass the cap, so it is not written. Its writer does without: a
    block is served from memory, a whole file stays on FUSE, an EROFS image's mount serves
    through FUSE."""


class MetadataRefused(MountError, IntegrityError):
    """The EROFS image an image manifest pins is missing, malformed or not the bytes pinned: the
    kernel never sees it, and no other data path stands in for the image's own metadata."""


class RunError(LazyfsError):
    pass


# --- the node agent ----------------------------------------------------------------------------

class NodeError(LazyfsError):
    """The node agent (`lazyfs node`) refused a request or could not be reached or started."""


class NodeUnavailable(NodeError):
    """No agent answers on the socket and none could be started."""


# --- the containerd snapshotter ----------------------------------------------------------------

class SnapshotError(LazyfsError):
    """A snapshot request containerd made cannot be done as asked (lazyfs.snapshotter)."""


class SnapshotNotFound(SnapshotError):
    exit_code = 2


class SnapshotExists(SnapshotError):
    """The key or name is taken (containerd's AlreadyExists, which also means "skip this layer")."""


class SnapshotConflict(SnapshotError):
    """The snapshot is not in a state that allows this (containerd's FailedPrecondition)."""


class SnapshotInvalid(SnapshotConflict):
    """The request itself is invalid: a key, labels, a parent that is not committed, a field
    that cannot change (containerd's InvalidArgument)."""


class SnapshotterUnavailable(SnapshotError):
    """The snapshotter cannot run here: no containerd protocol files, or not root."""
