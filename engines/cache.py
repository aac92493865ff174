"""The content-addressed engine cache (pure Python: no tensorrt, no GPU).

An engine is valid only for the exact ONNX bytes, build settings, profile shapes, TensorRT
version, GPU compute capability (and attention-plugin code) it was built from; the key is a
sha256 over all of them, so a changed size range or flag never reuses a stale engine.

CACHE/                       a bundle's engines/ folder
  <graph>-<key16>.plan       the serialized engine
  <graph>-<key16>.json       its record: the key's fields, the full key, the engine's sha256 and size
  <graph>-<key16>.lock       flock'd while the entry is checked, built or read
  timing-*.cache             TensorRT's timing caches (trt_build.py), merged under their own lock

Writes are atomic: the engine is built to a unique temp file in CACHE, then os.replace'd, then the
record (the commit marker) is written the same way. An engine whose bytes do not hash to its
record's sha256 (truncated, or another file copied over it) is rebuilt by `get_or_build` and
refused with an EliteError by `read`. Concurrent builds of one key serialise on the lock file:
the second finds the first's entry and reuses it.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from elite_export.errors import EliteError
from elite_export.runtime.bundle import file_sha256

REBUILD_HINT = "build them on this host with `elite-export build ... --backend tensorrt`"
Profile = dict[str, tuple[tuple[int, ...], ...]]  # {input: (min shape, opt shape, max shape)}


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def file_lock(path: str, shared: bool = False) -> Iterator[None]:
    """flock on `path` (created if absent): exclusive across processes and threads alike."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str, data: bytes | memoryview) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass(frozen=True)
class OnnxFingerprint:
    """The ONNX graph's content: its sha256 and those of its external-data files (by file name)."""
    sha256: str
    external_data: tuple[tuple[str, str], ...] = ()  # sorted (file name, sha256)

    @classmethod
    def from_manifest(cls, entry: dict) -> "OnnxFingerprint":
        """From a bundle manifest's graph-file entry {"path", "sha256", "external_data": {rel: sha}}."""
        ext = entry.get("external_data", {})
        return cls(entry["sha256"], tuple(sorted((os.path.basename(rel), sha) for rel, sha in ext.items())))

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "external_data": dict(self.external_data)}


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's bytes depend on."""
    graph: str
    onnx: OnnxFingerprint
    settings: tuple[tuple[str, object], ...]  # TrtBuildSettings.key_items(): every setting that shapes the engine
    profile: Profile
    trt_version: str
    compute_capability: str  # "9.0"
    plugin: str | None = None  # attention-plugin fingerprint when the graph uses it

    def fields(self) -> dict:
        """The key as JSON-able data (what the record stores and the digest hashes)."""
        d = asdict(self)
        d["onnx"] = self.onnx.to_dict()
        d["settings"] = dict(self.settings)
        d["profile"] = {name: [list(s) for s in shapes] for name, shapes in sorted(self.profile.items())}
        return d

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(self.fields(), sort_keys=True, separators=(",", ":")).encode())

    @property
    def stem(self) -> str:  # file names: <graph>-<first 16 hex of the key>
        return f"{self.graph}-{self.digest[:16]}"


@dataclass(frozen=True)
class CacheEntry:
    path: str  # the engine file
    record: dict

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def fields(self) -> dict:
        return self.record["fields"]

    def to_manifest(self, root: str) -> dict:
        """What a bundle manifest records of this engine (paths relative to the bundle `root`)."""
        f = self.fields
        return {"path": os.path.relpath(self.path, root), "sha256": self.sha256, "bytes": self.record["bytes"],
                "key": self.record["key"], "trt_version": f["trt_version"],
                "compute_capability": f["compute_capability"], "profile": f["profile"],
                "settings": f["settings"], "build_seconds": self.record["build_seconds"]}


class EngineCache:
    def __init__(self, root: str):
        self.root = root

    def _path(self, stem: str, ext: str) -> str:
        return os.path.join(self.root, f"{stem}.{ext}")

    def _read_record(self, path: str) -> dict | None:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) and "sha256" in record and "fields" in record else None

    def problem(self, key: EngineKey) -> str | None:
        """Why the entry for `key` is unusable ("missing", "truncated or foreign", ...); None when sound."""
        engine, record = self._path(key.stem, "plan"), self._read_record(self._path(key.stem, "json"))
        if not os.path.isfile(engine):
            return "missing"
        if record is None:
            return "has no readable record (an interrupted build?)"
        if record.get("key") != key.digest:
            return "has a record for another key"
        if os.path.getsize(engine) != record.get("bytes") or file_sha256(engine) != record["sha256"]:
            return "does not match its recorded sha256 (truncated or foreign)"
        return None

    def entry(self, key: EngineKey) -> CacheEntry:
        record = self._read_record(self._path(key.stem, "json"))
        assert record is not None, key.stem
        return CacheEntry(self._path(key.stem, "plan"), record)

    def get_or_build(self, key: EngineKey, build: Callable[[str], None],
                     log: Callable[[str], None] = print) -> CacheEntry:
        """The sound entry for `key`, building it with `build(path)` (which writes the engine to path) if needed."""
        os.makedirs(self.root, exist_ok=True)
        with file_lock(self._path(key.stem, "lock")):
            problem = self.problem(key)
            if problem is None:
                log(f"{key.graph}: engine {key.stem}.plan is cached")
                return self.entry(key)
            if problem != "missing":
                log(f"{key.graph}: cached engine {key.stem}.plan {problem}: rebuilding")
            self._build(key, build)
            return self.entry(key)

    def _build(self, key: EngineKey, build: Callable[[str], None]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{key.stem}.", suffix=".plan.tmp", dir=self.root)
        os.close(fd)
        try:
            start = time.perf_counter()
            build(tmp)
            seconds = time.perf_counter() - start
            size = os.path.getsize(tmp)
            if size == 0:
                raise RuntimeError(f"building {key.stem} wrote an empty engine")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            sha = file_sha256(tmp)
            os.replace(tmp, self._path(key.stem, "plan"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        record = {"key": key.digest, "fields": key.fields(), "sha256": sha, "bytes": size,
                  "build_seconds": round(seconds, 3), "created": time.time()}
        atomic_write(self._path(key.stem, "json"), json.dumps(record, indent=1).encode())

    def entries(self, graph: str) -> list[CacheEntry]:
        """Every recorded engine of `graph` whose file exists, newest first (not verified)."""
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.root), f"{graph}-*.json")):
            record = self._read_record(path)
            engine = path[: -len(".json")] + ".plan"
            if record is not None and record["fields"].get("graph") == graph and os.path.isfile(engine):
                found.append(CacheEntry(engine, record))
        return sorted(found, key=lambda e: e.record.get("created", 0), reverse=True)

    def find(self, graph: str, onnx: OnnxFingerprint, trt_version: str, compute_capability: str) -> CacheEntry:
        """The newest engine built from this ONNX graph for this TensorRT and GPU, checked before any
        deserialisation: an engine for another TensorRT or GPU is an EliteError telling to rebuild."""
        ours = [e for e in self.entries(graph) if e.fields["onnx"] == onnx.to_dict()]
        if not ours:
            raise EliteError(f"no TensorRT engine for {graph} of this bundle in {self.root}: {REBUILD_HINT}")
        here = [e for e in ours if (e.fields["trt_version"], e.fields["compute_capability"])
                == (trt_version, compute_capability)]
        if not here:
            f = ours[0].fields
            raise EliteError(f"the {graph} engine ({os.path.basename(ours[0].path)}) was built with TensorRT "
                             f"{f['trt_version']} for GPU compute capability {f['compute_capability']}; this host "
                             f"has TensorRT {trt_version} on compute capability {compute_capability}: {REBUILD_HINT}")
        return here[0]

    def read(self, entry: CacheEntry) -> bytes:
        """The engine's bytes, verified against its record (under the entry's lock: no half-built file)."""
        stem = os.path.basename(entry.path)[: -len(".plan")]
        with file_lock(self._path(stem, "lock"), shared=True):
            record = self._read_record(self._path(stem, "json")) or entry.record  # a rebuild may have renewed it
            with open(entry.path, "rb") as f:
                data = f.read()
        if len(data) != record["bytes"] or sha256_bytes(data) != record["sha256"]:
            raise EliteError(f"engine {entry.path} does not match its recorded sha256 ({len(data)} bytes, "
                             f"{record['bytes']} recorded): truncated or replaced; {REBUILD_HINT}")
        return data
