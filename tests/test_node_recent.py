"""The agent's memory of recent manifests (lazyfs.node.recent): bounded in bytes, least recently
used out first, never a wrong answer for a digest."""
from __future__ import annotations

from hypothesis import given, strategies as st

from lazyfs.node.recent import RecentManifests

ops = st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7), st.integers(0, 40)),
               max_size=60)


@given(ops, st.integers(0, 100))
def test_it_holds_at_most_its_budget_and_evicts_the_least_recently_used(seq, budget):
    recent = RecentManifests(budget)
    model: list[tuple[str, bytes]] = []  # most recently used last
    for op, key, size in seq:
        digest = f"d{key}"
        if op == "put":
            data = bytes([key]) * size
            recent.put(digest, data)
            if size <= budget:
                model = [(d, v) for d, v in model if d != digest] + [(digest, data)]
                while sum(len(v) for _, v in model) > budget:
                    model.pop(0)
        else:
            want = dict(model).get(digest)
            assert recent.get(digest) == want
            if want is not None:
                model = [(d, v) for d, v in model if d != digest] + [(digest, want)]
        assert len(recent) == len(model)
        assert sum(len(v) for _, v in model) <= budget
