"""What travels to a detached daemon as its command line comes back as it was sent."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lazyfs.fs.daemon import DaemonArgs
from lazyfs.source.spec import Source

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20)
sources = st.builds(Source, st.none() | text, st.lists(text, max_size=3).map(tuple),
                    st.floats(0.1, 100), st.floats(0, 10), st.integers(0, 64), st.booleans())
daemons = st.builds(DaemonArgs, digest=text, source=sources, cache_dir=text, mountpoint=text,
                    ref=st.just("") | text, ready_fd=st.none() | st.integers(0, 1000), debug=st.booleans(),
                    trace=st.none() | text, profile=st.sampled_from(["auto", "none"]) | text,
                    workload=st.none() | st.just("0123456789abcdef"),
                    layout=st.sampled_from(["fuse", "kernel"]), runtime_dir=st.just("") | text,
                    complete=st.booleans(), cache_size=st.none() | st.integers(1, 1 << 40))


@given(daemons)
def test_daemon_args_round_trip(args):
    assert DaemonArgs.parse(args.argv()) == args


@given(sources)
def test_a_source_round_trips_through_the_agent_request(source):
    from lazyfs import argv
    p = argv.Parser()  # the parser the agent reads a request's source with
    Source.add_arguments(p)
    assert Source.from_namespace(p.parse_args(source.args())) == source


def test_defaults_are_not_written():
    args = DaemonArgs("sha256:" + "a" * 64, Source(), "/cache", "/mnt")
    assert args.argv() == ["--digest=sha256:" + "a" * 64, "--cache-dir=/cache", "--", "/mnt"]


def test_a_value_of_two_dashes_travels():
    """argparse drops a "--" even given as --flag=--; the parsers lazyfs reads argv with do not."""
    args = DaemonArgs("0", Source(store="--", servers=("--",)), "0", "--", profile="--")
    assert DaemonArgs.parse(args.argv()) == args


@pytest.mark.parametrize("store,servers,env,batches,remote", [
    ("/srv/store", (), None, False, False),
    ("file:///srv/store", (), None, False, False),
    ("s3://bucket/prefix", (), None, False, True),
    ("http://127.0.0.1:9000", (), None, True, True),
    (None, ("http://127.0.0.1:9000",), None, True, True),
    ("/srv/origin", ("http://127.0.0.1:9000",), None, True, True),
    (None, (), "https://cache.example:9000", True, True),  # the default store counts too
    (None, (), "/srv/default", False, False),
])
def test_what_a_source_answers_in_one_request_and_whether_it_is_remote(monkeypatch, store, servers,
                                                                       env, batches, remote):
    """One spelling for both facts: the page server's batch stream, the mount's profile choice
    and a mount's profile learning all ask the Source."""
    if env is None:
        monkeypatch.delenv("LAZYFS_STORE", raising=False)
    else:
        monkeypatch.setenv("LAZYFS_STORE", env)
    source = Source(store=store, servers=servers)
    assert source.batches() is batches and source.takes_profiles() is batches
    assert source.remote() is remote
