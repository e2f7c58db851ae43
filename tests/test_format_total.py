"""Every decoder in lazyfs/format is total: for any input it returns a value or raises a
FormatError. Inputs aim at the standard library's own exceptions: JSON nested past the recursion
limit, infinities where integers belong, wrong JSON types behind a valid magic."""
from __future__ import annotations

import inspect
import json
import pkgutil
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

import lazyfs.format
from lazyfs.errors import FormatError
from lazyfs.format import batch, block, manifest as mf, metaimage, profile, provenance, snapshot, trace

DIGEST = "sha256:" + "0" * 64


def _manifest_head(config: bytes) -> bytes:
    return (struct.pack("<8sHHII", mf.MAGIC, mf.VERSION, 0, 4096, 1)
            + struct.pack("<I", len(config)) + config)


# Each decoder, and how to put a JSON-ish body where it reads JSON.
DECODERS = {
    "manifest.decode": (mf.decode, _manifest_head),
    "manifest.decode_config": (mf.decode_config, _manifest_head),
    "manifest.decode_meta": (mf.decode_meta, _manifest_head),
    "metaimage.decode": (metaimage.decode, lambda body: metaimage.MAGIC + b"\x01\x00" + body),
    "profile.decode": (profile.decode, lambda body: profile.MAGIC + body),
    "snapshot.decode": (snapshot.decode, lambda body: snapshot.MAGIC + body),
    "provenance.decode": (provenance.decode, lambda body: provenance.MAGIC + body),
    "batch.decode_header": (batch.decode_header, lambda body: body + b"\n"),
    "block.decode": (lambda data: block.decode(DIGEST, data), lambda body: body),
    "block.decompress": (block.decompress, lambda body: body),
    "block.decompress (shuffled)": (block.decompress, lambda body: block.SHUFFLED + body),
    "block.decompress (shuffled frame)": (block.decompress, lambda body: block.SHUFFLED + zstandard
                                           .ZstdCompressor(write_content_size=True).compress(body)),
    "block.declared_size": (block.declared_size, lambda body: body),
    "trace.decode": (trace.decode, lambda body: body.decode("utf-8", "surrogateescape")),
    "trace.decode_all": (trace.decode_all, lambda body: body.decode("utf-8", "surrogateescape")
                         .splitlines()),
}


def test_every_decoder_is_covered():
    """A decoder added to lazyfs/format without a row above fails here, not in production."""
    found = set()
    for info in pkgutil.iter_modules(lazyfs.format.__path__):
        module = __import__(f"lazyfs.format.{info.name}", fromlist=["_"])
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and (name.startswith("decode") or name == "decompress"):
                found.add(f"{info.name}.{name}")
    assert found <= set(DECODERS), sorted(found - set(DECODERS))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["image", "blocks", "files", "meta", "name", "size", "chunks",
                         "mount_path", "created", "Env", "t", "path", "offset", "source", "ref",
                         "manifest"]), inner,
        max_size=4),
    max_leaves=12)


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "deep", "binary", "inf"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":  # past the interpreter's recursion limit: json raises RecursionError
        depth = draw(st.integers(2_000, 100_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth).encode()
    if kind == "inf":
        return json.dumps({"image": DIGEST, "blocks": [[DIGEST, float("inf"), 1]],
                           "files": [{"name": "a", "size": float("inf"), "chunks": []}],
                           "mount_path": "/", "meta": {}}).encode()
    return draw(st.binary(max_size=300))


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(body=bodies())
def test_decoder_is_total(name, body):
    decoder, wrap = DECODERS[name]
    try:
        decoder(wrap(body))
    except FormatError:
        pass


@pytest.mark.parametrize("name", ["manifest.decode_config", "profile.decode", "snapshot.decode",
                                  "trace.decode"])
def test_deep_json_is_a_typed_error(name):
    decoder, wrap = DECODERS[name]
    with pytest.raises(FormatError, match="RecursionError"):
        decoder(wrap(b"[" * 100_000 + b"]" * 100_000))


@pytest.mark.parametrize("line", [b"+2_00 0", b"200 +5", b"200 5\r", b"200 0_0", b" 200 5", b"200  5",
                                  b"200 05", b"0200 5"])
def test_a_batch_header_has_one_spelling(line):
    """What int() would also take ("+2_00", "0_0", a trailing CR) is not the protocol's header."""
    assert batch.decode_header(batch.encode_header(DIGEST, 200, 5)) == (DIGEST, 200, 5)
    with pytest.raises(FormatError):
        batch.decode_header(DIGEST.encode() + b" " + line + b"\n")
