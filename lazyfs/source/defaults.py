"""How a mount reads from its source, by default: the one place these numbers are spelled (the
CLI options, the daemon's arguments, Source and FleetOptions all take them from here)."""

DEADLINE = 30.0  # seconds a block read may take before it fails (EIO)
HEDGE_AFTER = 0.5  # seconds before a slow server request is duplicated to the next server
READAHEAD = 4  # blocks after one read sequentially, or after a miss, fetched in the background
SIBLINGS = True  # first small file read in a directory: batch-fetch its small siblings
COMPLETE_IDLE = 2.0  # --complete: seconds without a demand read before background fetches start


def duration(seconds: float) -> str:
    """A default as the CLI spells durations (30s, 500ms)."""
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"
