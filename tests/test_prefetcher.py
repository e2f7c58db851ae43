"""The profile prefetcher on its own: an injected batch fetch, a real node cache, no network."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from lazyfs.cache.nodecache import NodeCache
from lazyfs.cache.prefetcher import Prefetcher
from lazyfs.errors import BlockNotFound, LazyfsError
from lazyfs.format import block
from lazyfs.records.objects import fetch_blocks
from tests.test_nodecache import FakeOrigin, _blob


class BatchOrigin(FakeOrigin):
    """Batch fetches through the same code path the stores use (objects.fetch_blocks)."""

    def __init__(self, blobs, delay=0.0, missing=(), wrong=()):
        super().__init__(blobs, delay)
        self.missing, self.wrong = set(missing), set(wrong)
        self.batches: list[list[str]] = []
        self.rejected: list[str] = []

    def frames_of(self, wanted):
        self.batches.append(list(wanted))
        for d in wanted:
            time.sleep(self.delay)
            if d in self.missing:
                yield d, None
            elif d in self.wrong:
                yield d, block.encode(b"not the block")[1]
            else:
                yield d, self.frames[d]

    def one(self, digest, size):
        if digest in self.missing or digest in self.wrong:
            raise BlockNotFound(digest)
        return self(digest, size)

    def fetch_many(self, items):
        return fetch_blocks(items, self.one, self.frames_of,
                            lambda digest, exc: self.rejected.append(digest))


def _blobs(n, size=50_000):
    return dict(_blob(size, seed) for seed in range(n))


def test_prefetches_in_profile_order_in_batches(tmp_path):
    blobs = _blobs(20)
    order = list(blobs)
    origin = BatchOrigin(blobs)
    cache = NodeCache(tmp_path, origin)
    pf = Prefetcher(cache, origin.fetch_many, [(d, len(blobs[d])) for d in order], batch=4, streams=1)
    assert pf.start().wait(10)
    s = pf.stats.snapshot()
    assert s["fetched"] == 20 and s["done"] == 1 and s["failed"] == 0
    assert [d for b in origin.batches for d in b] == order and len(origin.batches) == 5
    # Everything is now a hit: no further fetches when the workload reads.
    for d in order:
        assert cache.read(d, len(blobs[d]), 0, 10) == blobs[d][:10]
    assert cache.stats.misses == 20 and cache.stats.hits == 20 and origin.calls == []


def test_demand_read_does_not_wait_behind_the_queue(tmp_path):
    blobs = _blobs(40)
    order = list(blobs)
    origin = BatchOrigin(blobs, delay=0.05)  # 40 blocks take 2 s one stream at a time
    cache = NodeCache(tmp_path, origin)
    pf = Prefetcher(cache, origin.fetch_many, [(d, len(blobs[d])) for d in order], batch=2, streams=1).start()
    last = order[-1]
    t0 = time.monotonic()
    assert cache.read(last, len(blobs[last]), 0, 100) == blobs[last][:100]
    assert time.monotonic() - t0 < 0.5  # fetched on demand, not after 39 queued blocks
    assert origin.calls == [last]  # the demand read's own fetch
    pf.wait(10)
    assert last not in [d for b in origin.batches for d in b]  # and the prefetcher skipped it
    assert pf.stats.already >= 1


def test_failures_release_claims_and_reads_still_get_right_bytes(tmp_path):
    blobs = _blobs(8)
    order = list(blobs)
    origin = BatchOrigin(blobs, missing=order[:2], wrong=order[2:4])
    cache = NodeCache(tmp_path, origin)
    pf = Prefetcher(cache, origin.fetch_many, [(d, len(blobs[d])) for d in order], batch=8, streams=2)
    assert pf.start().wait(10)
    assert pf.stats.failed == 4 and pf.stats.fetched == 4
    assert sorted(origin.rejected) == sorted(order[2:4])  # wrong bytes in a batch are reported
    # Nothing is left claimed: a read of a failed block fetches it itself (and here fails cleanly).
    origin.missing.clear()
    origin.wrong.clear()
    done = []
    t = threading.Thread(target=lambda: done.append(cache.read(order[0], len(blobs[order[0]]), 0, 5)))
    t.start()
    t.join(5)
    assert done == [blobs[order[0]][:5]]


def test_blocks_a_prefetch_finds_on_disk_are_no_hits_until_read(tmp_path):
    blobs = _blobs(4)
    origin = BatchOrigin(blobs)
    first = NodeCache(tmp_path, origin)
    for d, data in blobs.items():
        first.read(d, len(data), 0, 1)
    first.close()
    origin.calls.clear()
    cache = NodeCache(tmp_path, origin)  # the next mount: its profile's blocks are all here
    pf = Prefetcher(cache, origin.fetch_many, [(d, len(b)) for d, b in blobs.items()])
    assert pf.start().wait(10)
    assert pf.stats.already == 4 and cache.stats.hits == 0 and cache.stats.misses == 0
    for d, data in blobs.items():
        assert cache.read(d, len(data), 0, 5) == data[:5]
    assert cache.stats.hits == 4 and origin.calls == [] and origin.batches == []


def test_a_cached_block_listed_with_another_size_is_neither_dropped_nor_fetched(tmp_path):
    blobs = _blobs(2)
    (good, data), (other, _) = blobs.items()
    origin = BatchOrigin(blobs)
    first = NodeCache(tmp_path, origin)
    first.read(good, len(data), 0, 1)
    first.close()
    cache = NodeCache(tmp_path, origin)  # the next mount, of an image with a wrong size for it
    pf = Prefetcher(cache, origin.fetch_many, [(good, len(data) + 1), (other, len(blobs[other]))])
    assert pf.start().wait(10)
    assert pf.stats.failed == 1 and pf.stats.fetched == 1
    assert [d for b in origin.batches for d in b] == [other]
    assert Path(cache.path(good)).read_bytes() == data and cache.stats.dropped_corrupt == 0


def test_each_block_brought_in_is_handed_on_verified_and_no_failed_one_is(tmp_path):
    """on_block (a lazy restore's page handler) gets every block the stream brought, as it lands,
    with its verified bytes, in the list's order; never one that was missing or wrong; and a
    consumer that fails on one does not stop the stream."""
    blobs = _blobs(8)
    order = list(blobs)
    origin = BatchOrigin(blobs, missing=order[:2], wrong=order[2:4])
    handed = []

    def on_block(digest, data):
        handed.append((digest, data))
        if digest == order[5]:
            raise RuntimeError("the consumer fails on this one")
    pf = Prefetcher(NodeCache(tmp_path, origin), origin.fetch_many,
                    [(d, len(blobs[d])) for d in order], batch=3, on_block=on_block)
    assert pf.start().wait(10)
    assert handed == [(d, blobs[d]) for d in order[4:]]
    assert pf.stats.fetched == 4 and pf.stats.failed == 4


def test_batch_that_breaks_off_falls_back_to_single_fetches(tmp_path):
    blobs = _blobs(6)
    order = list(blobs)
    origin = BatchOrigin(blobs)

    def broken(wanted):
        yield wanted[0], origin.frames[wanted[0]]
        raise LazyfsError("connection reset mid-batch")
    results = list(fetch_blocks([(d, len(blobs[d])) for d in order], origin.one, broken,
                                lambda d, e: None))
    assert [d for d, _ in results] == order
    assert all(data == blobs[d] for d, data in results)
    assert origin.calls == order[1:]


def test_an_unchecked_list_naming_what_nobody_has_stops_after_a_batch(tmp_path):
    """A snapshot's working set names image blocks nobody checked: once more of them are missing
    than were fetched (a batch's worth), the rest is not asked for. A checked list (a startup
    profile planned against the manifest) is fetched to the end whatever it meets."""
    real = _blobs(4)
    bogus = [_blob(10_000, 1000 + i) for i in range(40)]
    blocks = [(d, len(b)) for d, b in bogus] + [(d, len(b)) for d, b in real.items()]
    for unchecked, overlap, batches, missing, fetched in ((True, 0, 1, 8, 0), (True, 3, 1, 8, 0),
                                                           (False, 0, 6, 40, 4)):
        origin = BatchOrigin(real, missing={d for d, _ in bogus})
        cache = NodeCache(tmp_path / f"{unchecked}-{overlap}", origin)
        # (overlapping streams: the stop is decided before the second batch would go out)
        p = Prefetcher(cache, origin.fetch_many, blocks, batch=8, unchecked=unchecked,
                       streams=2 if overlap else 1, overlap=overlap).start()
        assert p.wait(10)
        s = p.stats.snapshot()
        assert (len(origin.batches), s["missing"], s["failed"], s["fetched"]) == \
            (batches, missing, missing, fetched)


def test_overlapping_streams_ask_for_the_next_batch_near_the_end_of_the_last(tmp_path):
    """With overlap, the next batch's request goes out once the batch before has at most that
    many blocks to come, never earlier and never more than one ahead; every block comes once."""
    blobs = _blobs(40, size=20_000)
    order = list(blobs)
    origin = BatchOrigin(blobs, delay=0.01)
    delivered: list[str] = []
    seen_at_start: list[int] = []  # blocks delivered when each batch's request went out

    def fetch_many(items):
        seen_at_start.append(len(delivered))
        for digest, data in origin.fetch_many(items):
            delivered.append(digest)
            yield digest, data
    cache = NodeCache(tmp_path, origin)
    pf = Prefetcher(cache, fetch_many, [(d, len(blobs[d])) for d in order], batch=8, streams=2,
                    overlap=3)
    assert pf.start().wait(20)
    assert pf.stats.snapshot()["fetched"] == 40 and pf.stats.batches == 5
    assert sorted(delivered) == sorted(order) and len(delivered) == 40
    # Batch k (of 8) starts after batch k-1 has delivered 5 of its 8 blocks (3 left to come),
    # so before it ends: the next request overlaps the last blocks of the one before.
    assert [b[0] for b in origin.batches] == order[::8]
    for k, seen in enumerate(seen_at_start[1:], start=1):
        assert 8 * (k - 1) + 5 <= seen < 8 * k
    for d in order:
        assert cache.read(d, len(blobs[d]), 0, 10) == blobs[d][:10]


def test_overlapping_streams_stop_and_hand_on_when_a_batch_fails(tmp_path):
    blobs = _blobs(24, size=10_000)
    order = list(blobs)
    origin = BatchOrigin(blobs)
    calls = []

    def fetch_many(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise LazyfsError("the server went away")
        return origin.fetch_many(items)
    cache = NodeCache(tmp_path, origin)
    pf = Prefetcher(cache, fetch_many, [(d, len(blobs[d])) for d in order], batch=8, streams=2,
                    overlap=2)
    assert pf.start().wait(10)  # a failed batch still hands the turn on: nobody waits for ever
    s = pf.stats.snapshot()
    assert s["failed"] == 8 and s["fetched"] == 16 and s["done"] == 1
    stopped = Prefetcher(cache, fetch_many, [(d, 1) for d in order], batch=8, streams=2, overlap=2)
    stopped.stop()
    assert stopped.start().wait(5)


def test_a_burst_of_background_batches_takes_a_bounded_number_of_threads(tmp_path):
    """Sibling and readahead batches (fetch_missing) are guesses: forty at once against a slow
    server take at most BACKGROUND_BATCHES threads (a thread each could fail to start, and fail
    a read whose data was already in hand); the rest are left out, and every block still reads
    exact, fetched by its read."""
    from lazyfs.cache import prefetcher
    blobs = _blobs(40, size=8_000)
    origin = BatchOrigin(blobs, delay=0.05)
    cache = NodeCache(tmp_path, origin)
    guessed = []
    for digest, data in blobs.items():
        prefetcher.fetch_missing(cache, origin.fetch_many, [(digest, len(data))], guessed.extend)
    running = sum(1 for t in threading.enumerate() if t.name.startswith("batch-prefetch"))
    assert 1 <= running <= prefetcher.BACKGROUND_BATCHES
    assert len(guessed) == prefetcher.BACKGROUND_BATCHES  # (only what was really asked for)
    for digest, data in blobs.items():
        assert cache.read(digest, len(data), 0, len(data)) == data
    deadline = time.monotonic() + 10
    while any(t.name.startswith("batch-prefetch") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(origin.batches) == prefetcher.BACKGROUND_BATCHES


def test_a_batch_that_gets_no_thread_is_left_out_and_its_slot_given_back(tmp_path, monkeypatch):
    """A process at its limit on tasks cannot start the thread of a background batch (a read's
    sibling or readahead guess): the guess is left out, the read that made it still answers
    (an exception here would be an EIO for bytes the read has), nothing is recorded as guessed,
    and the batch's slot comes back."""
    import types
    from lazyfs.cache import prefetcher

    blobs = _blobs(4)
    origin = BatchOrigin(blobs)
    cache = NodeCache(tmp_path, origin)
    wanted = [(d, len(b)) for d, b in blobs.items()]

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    stand_in = types.ModuleType("threading")  # (the prefetcher's threads alone get none)
    stand_in.__dict__.update(vars(threading))
    stand_in.Thread = NoThread
    monkeypatch.setattr(prefetcher, "threading", stand_in)
    told = []
    for _ in range(prefetcher.BACKGROUND_BATCHES + 1):  # (a slot not given back would run out)
        prefetcher.fetch_missing(cache, origin.fetch_many, wanted, before=told.append)
    assert told == [] and origin.batches == []
    monkeypatch.undo()
    prefetcher.fetch_missing(cache, origin.fetch_many, wanted, before=told.append)
    deadline = time.monotonic() + 10
    while not origin.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert origin.batches == [[d for d, _ in wanted]]  # a thread to be had: the batch went out
    assert told == [wanted]
    assert all(cache.read(d, n, 0, 5) == blobs[d][:5] for d, n in wanted)
