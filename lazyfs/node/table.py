"""The agent's table of shared mounts and their leases, and how it survives the agent.

One shared mount per image *and* mount options (store, cache directory, data path, profile,
completion): two runs that would have mounted the same thing share it. Each user holds a lease:

- ``run``: held by a process (a `lazyfs run`); the agent watches it with a pidfd and drops the
  lease when it exits, however it exits. A pid is recorded with the process's start time, so a
  reused pid is never mistaken for the holder.
- ``mount``: a `lazyfs mount` bind mount at ``target``; dropped by `lazyfs umount`, or when the
  target is found unmounted.
- ``snapshot``: a containerd snapshot (lazyfs.snapshotter) whose lower is this mount, named by
  ``target``; held until the snapshotter removes the snapshot, across restarts of either side.

Every change is written to ``<node dir>/images/<key>.json`` (temp file + rename) before the agent
answers, so an agent started after a crash or an upgrade adopts the mounts and their users.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lazyfs import paths
from lazyfs.proc.ident import proc_start


LEASE_KINDS = ("run", "mount", "snapshot")


@dataclass
class Lease:
    id: str
    kind: str  # one of LEASE_KINDS
    pid: int = 0
    start: int = 0  # the holder's start time (/proc/PID/stat field 22, clock ticks after boot)
    target: str = ""  # kind "mount": the bind mount; "snapshot": the snapshot
    since: float = 0.0

    @classmethod
    def new(cls, kind: str, pid: int = 0, target: str = "") -> "Lease":
        return cls(uuid.uuid4().hex[:16], kind, pid, proc_start(pid) or 0 if pid else 0, target, time.time())

    def holder_alive(self) -> bool:
        return self.kind != "run" or (self.pid > 0 and proc_start(self.pid) == self.start)


@dataclass
class Shared:
    key: str
    digest: str
    ref: str
    options: dict  # what makes two mounts the same one (fingerprint)
    mountpoint: str
    daemon_pid: int = 0
    layout: str = ""
    config: dict = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)
    mounted_at: float = 0.0
    idle_since: float | None = None  # when the last lease went
    profile_blocks: list[str] = field(default_factory=list)  # kept longest under the cache cap

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Shared":
        doc = json.loads(text)
        doc["leases"] = [Lease(**x) for x in doc.get("leases", [])]
        return cls(**doc)


def key(digest: str, options: dict) -> str:
    blob = json.dumps({"digest": digest, **options}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]




def images_dir() -> Path:
    return paths.node_dir() / "images"


def mounts_dir() -> Path:
    return paths.node_dir() / "mnt"


def save(shared: Shared) -> None:
    d = images_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{shared.key}.tmp"
    tmp.write_text(shared.to_json())
    os.replace(tmp, d / f"{shared.key}.json")


def forget(shared: Shared) -> None:
    (images_dir() / f"{shared.key}.json").unlink(missing_ok=True)


def load_all() -> list[Shared]:
    out = []
    for p in sorted(images_dir().glob("*.json")):
        try:
            out.append(Shared.from_json(p.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            p.unlink(missing_ok=True)  # a torn or foreign file: nothing can be adopted from it
    return out
