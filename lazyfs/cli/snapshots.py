"""`lazyfs snapshots`: the process snapshots in a store."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lazyfs.cli import app
from lazyfs.cli.common import JsonOpt, StoreOpt, err, human, out


@app.command(help="List process snapshots (made with `lazyfs run --snapshot SNAP`): the image each "
                  "one pins, its size and when it was taken. Restore one with "
                  "`lazyfs run --restore SNAP NAME:TAG`.")
def snapshots(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    from lazyfs.format import kinds, snapshot as snapfmt
    from lazyfs.records import objects
    from lazyfs.store import open_store

    st = open_store(store)
    rows = []
    for name, tag, digest in st.list_tags():
        data = objects.read_manifest_bytes(st, digest)
        if kinds.kind(data) != kinds.SNAPSHOT:
            continue
        snap = snapfmt.decode(data)
        rows.append({"snapshot": f"{name}:{tag}", "digest": digest, "image": snap.image,
                     "image_ref": snap.meta.get("ref"), "bytes": sum(f.size for f in snap.files),
                     "blocks": len(snap.blocks()), "created": snap.created,
                     "argv": snap.meta.get("argv")})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("SNAPSHOT", "IMAGE", "SIZE", "BLOCKS", "TAKEN", "COMMAND", box=None)
    for r in rows:
        table.add_row(r["snapshot"], f"{r['image_ref']} ({r['image'][7:19]})", human(r["bytes"]),
                      str(r["blocks"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                      " ".join(r["argv"] or []))
    out.print(table)


@app.command("snapshot-helper", help="Write the snapshot helper module lazyfs_snapshot.py (standard "
                                     "library only) into DIR, for images run by other tools, or "
                                     "print it with '-'. Every `lazyfs run` already has it on "
                                     "PYTHONPATH. Example, in a Dockerfile's build context: "
                                     "lazyfs snapshot-helper ./app/ (then COPY it beside the app).")
def snapshot_helper(directory: str = typer.Argument(..., metavar="DIR|-")):
    import shutil
    import sys

    from lazyfs.runner.helper import SOURCE

    if directory == "-":
        sys.stdout.write(SOURCE.read_text())
        return
    target = Path(directory)
    if not target.is_dir():
        raise typer.BadParameter(f"{directory} is not a directory")
    shutil.copyfile(SOURCE, target / SOURCE.name)
    err.print(f"wrote {target / SOURCE.name}", highlight=False)
