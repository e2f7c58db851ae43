"""`lazyfs serve`: a cache server in front of a store."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import StoreOpt, err, human, parse_duration, parse_size


@app.command(help="Serve a store's blocks, manifests and tags over HTTP (docs/protocol.md), with a "
                  "size-capped disk cache that fills misses from the store (the origin: usually "
                  "s3://BUCKET/PREFIX) and verifies every object before caching or sending it. "
                  "Nodes use it with `lazyfs mount/run --server URL`; several servers shard blocks "
                  "by rendezvous hashing. Example: lazyfs serve --store s3://images/prod "
                  "--listen 0.0.0.0:7070 --cache-dir /var/cache/lazyfs --cache-size 200G "
                  "--token-file /etc/lazyfs/token")
def serve(
    store: Optional[str] = StoreOpt,
    listen: str = typer.Option("127.0.0.1:7070", "--listen", help="HOST:PORT to listen on."),
    cache_dir: Path = typer.Option(..., "--cache-dir", help="Disk cache directory (kept across "
                                   "restarts; one server per directory)."),
    cache_size: str = typer.Option("10G", "--cache-size", help="Cap on the disk cache (e.g. 50G); "
                                   "least recently used objects are evicted past it."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File whose first line is "
                                              "the bearer token that PUT/DELETE (and, with "
                                              "--auth-reads, reads) require. Without it the server "
                                              "is read-only."),
    auth_reads: bool = typer.Option(False, "--auth-reads", help="Require a token for reads too "
                                    "(the write token or the node token; /healthz and /metrics "
                                    "stay open)."),
    node_token_file: Optional[Path] = typer.Option(None, "--node-token-file", help="File whose "
                                                   "first line is the token nodes hold: it lets "
                                                   "them read (with --auth-reads) and contribute "
                                                   "startup profiles, never write. Without it, "
                                                   "a server with open reads takes profiles from "
                                                   "whoever may read."),
    profiles: bool = typer.Option(True, "--profiles/--no-profiles", help="Take the startup "
                                  "profiles nodes learn (POST /v1/profiles) and merge them into "
                                  "the store's, so later cold starts on any node prefetch them."),
    delay: str = typer.Option("0", "--delay", help="Add this much latency before answering each "
                              "data request (e.g. 1ms): emulates a network RTT in benchmarks."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One JSON line per "
                                    "request on stderr."),
    max_connections: Optional[int] = typer.Option(None, "--max-connections", min=1, help="Open "
                                                  "connections at most (default 1024, or half "
                                                  "the open-file limit if lower). Past it the "
                                                  "oldest connection still waiting for its "
                                                  "headers is closed, or, if none, the new one "
                                                  "gets 503."),
    send_timeout: str = typer.Option("60s", "--send-timeout", help="A connection whose client takes "
                                     "none of its answer's bytes for this long is closed (TCP_USER_"
                                     "TIMEOUT): a client that never reads must not hold a connection "
                                     "and its cache files for good."),
    header_timeout: str = typer.Option("10s", "--header-timeout", help="A connection that has "
                                       "not sent a request's headers this long after connecting "
                                       "(or after its previous answer) is closed."),
):
    from cache_server.app import ServerConfig
    from cache_server.protocol import Guard, default_max_connections
    from cache_server.server import ServeOptions, parse_listen, serve_forever
    from lazyfs.errors import LazyfsError
    from lazyfs.proc import syscalls
    from lazyfs.store import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_listen(listen)
    token = _token(token_file, "--token-file")
    node_token = _token(node_token_file, "--node-token-file")
    if token and node_token == token:
        raise LazyfsError("--node-token-file holds the write token: nodes would be able to write")
    origin = open_store(store)
    origin.check()
    from lazyfs.store.local import LocalStore
    if isinstance(origin, LocalStore) and not origin.initialised():
        # Every answer would be 404: a missing origin reads as a store without the block, and
        # nodes take "every server agrees it is not there" for the truth. With a write token,
        # builds through this server will make it.
        if not token:
            raise LazyfsError(f"no lazyfs store at {origin.root}, and no --token-file to build "
                              "one through this server")
        logging.getLogger("lazyfs.server").warning("no lazyfs store at %s yet: it is made by the "
                                                   "first build through this server", origin.root)
    size = parse_size(cache_size)
    delay_s = parse_duration(delay)
    guard = Guard(max_connections=max_connections or default_max_connections(),
                  header_timeout=parse_duration(header_timeout), send_timeout=parse_duration(send_timeout))
    opts = ServeOptions(host, port, cache_dir, size,
                        ServerConfig(token=token, auth_reads=auth_reads, node_token=node_token,
                                     profiles=profiles, delay=delay_s), access_log,
                        guard)
    err.print(f"lazyfs serve: {origin.url} on http://{host}:{port}, cache {cache_dir} "
              f"({human(size)}), writes {'need the token' if token else 'disabled'}"
              + (f", startup profiles from {'node-token holders' if node_token or auth_reads else 'readers'}"
                 if profiles else ", no startup profiles")
              + (f", +{delay_s * 1000:.1f} ms per request" if delay_s else "")
              + f", at most {guard.max_connections} connections", highlight=False)
    syscalls.set_name("lazyfs-serve")
    serve_forever(origin, opts)


def _token(path: Optional[Path], flag: str) -> Optional[str]:
    """The first line of a token file (at least 16 characters), or None without one."""
    from lazyfs.errors import LazyfsError
    if path is None:
        return None
    try:
        token = path.read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise LazyfsError(f"{flag} {path}: {getattr(exc, 'strerror', None) or 'empty'}") from None
    if len(token) < 16:
        raise LazyfsError(f"{flag} {path}: the token must be at least 16 characters")
    return token
