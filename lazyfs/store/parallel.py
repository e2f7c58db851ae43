"""put_blocks for remote stores: uploads in parallel over a bounded window, results in input order."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def parallel_puts(put: Callable[[str, bytes], bool], items: Iterable[tuple[str, bytes]],
                  threads: int) -> Iterator[tuple[str, bool]]:
    """At most 2 x threads frames are held at once, so a build's memory stays flat."""
    with ThreadPoolExecutor(threads, thread_name_prefix="put") as pool:
        pending: deque = deque()
        try:
            for digest, frame in items:
                pending.append((digest, pool.submit(put, digest, frame)))
                if len(pending) >= 2 * threads:
                    digest0, fut = pending.popleft()
                    yield digest0, fut.result()
            while pending:
                digest0, fut = pending.popleft()
                yield digest0, fut.result()
        finally:
            for _, fut in pending:  # an error or an abandoned iteration: start nothing more
                fut.cancel()
