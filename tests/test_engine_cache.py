"""The content-addressed engine cache, with fake engine bytes from an injected build function."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import replace

import pytest

from elite_export.engines.cache import REBUILD_HINT, EngineCache, EngineKey, OnnxFingerprint
from elite_export.runtime.bundle import file_sha256
from elite_export.engines.trt_build import TrtBuildSettings, engine_profile
from elite_export.errors import EliteError
from elite_export.specs import ModelDims, ShapeRanges, UnetSpec


def make_key(**changes) -> EngineKey:
    key = EngineKey(graph="unet", onnx=OnnxFingerprint("a" * 64, (("unet.onnx.data", "b" * 64),)),
                    settings=TrtBuildSettings().key_items(),
                    profile=engine_profile(UnetSpec(ModelDims()), ShapeRanges(), static=False),
                    trt_version="10.13.0.35", compute_capability="9.0")
    return replace(key, **changes)


def fake_builder(payload: bytes, calls: list | None = None, delay: float = 0.0):
    """A build function writing `payload` as the engine (what build_engine does with a real plan)."""
    def build(path: str) -> None:
        if calls is not None:
            calls.append(path)
        time.sleep(delay)
        with open(path, "wb") as f:
            f.write(payload)
    return build


def leftovers(root) -> list[str]:
    return [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_key_changes_with_every_input_and_only_then():
    base = make_key()
    assert make_key().digest == base.digest  # deterministic
    variants = {
        "onnx sha": make_key(onnx=OnnxFingerprint("c" * 64, base.onnx.external_data)),
        "external data sha": make_key(onnx=OnnxFingerprint(base.onnx.sha256, (("unet.onnx.data", "d" * 64),))),
        "opt level": make_key(settings=TrtBuildSettings(optimization_level=5).key_items()),
        "workspace": make_key(settings=TrtBuildSettings(workspace_mib=4096).key_items()),
        "refit": make_key(settings=TrtBuildSettings(refittable=True).key_items()),
        "static flag": make_key(settings=TrtBuildSettings(static_shapes=True).key_items()),
        "size range": make_key(profile=engine_profile(UnetSpec(ModelDims()), ShapeRanges(size=(256, 512, 768)),
                                                      static=False)),
        "batch range": make_key(profile=engine_profile(UnetSpec(ModelDims()), ShapeRanges(batch=(1, 2, 4)),
                                                       static=False)),
        "trt version": make_key(trt_version="10.14.1.48"),
        "compute capability": make_key(compute_capability="8.9"),
        "plugin": make_key(plugin="e" * 64),
        "graph": make_key(graph="vae_decoder"),
    }
    digests = [v.digest for v in variants.values()]
    assert base.digest not in digests and len(set(digests)) == len(digests)
    # where the timing cache lives is not part of what the engine is
    assert TrtBuildSettings(timing_cache="/x/t.cache").key_items() == TrtBuildSettings().key_items()
    assert base.stem == f"unet-{base.digest[:16]}"


def test_build_once_then_reuse(tmp_path):
    cache, key, calls, log = EngineCache(str(tmp_path)), make_key(), [], []
    entry = cache.get_or_build(key, fake_builder(b"engine-1", calls), log.append)
    again = cache.get_or_build(key, fake_builder(b"engine-2", calls), log.append)
    assert len(calls) == 1 and again.path == entry.path and open(entry.path, "rb").read() == b"engine-1"
    assert entry.sha256 == file_sha256(entry.path) and entry.record["key"] == key.digest
    assert "cached" in log[-1] and cache.problem(key) is None and not leftovers(tmp_path)
    assert cache.read(entry) == b"engine-1"
    manifest = entry.to_manifest(str(tmp_path.parent))
    assert manifest["path"] == os.path.join(tmp_path.name, f"{key.stem}.plan")
    assert manifest["trt_version"] == "10.13.0.35" and manifest["sha256"] == entry.sha256


def test_changed_key_builds_a_new_engine(tmp_path):
    cache, calls = EngineCache(str(tmp_path)), []
    a = cache.get_or_build(make_key(), fake_builder(b"a", calls), lambda _: None)
    b = cache.get_or_build(make_key(settings=TrtBuildSettings(static_shapes=True).key_items()),
                           fake_builder(b"b", calls), lambda _: None)
    assert len(calls) == 2 and a.path != b.path


@pytest.mark.parametrize("damage", ["truncate", "foreign", "drop record", "other record"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    cache, key, other = EngineCache(str(tmp_path)), make_key(), make_key(graph="vae_decoder")
    entry = cache.get_or_build(key, fake_builder(b"x" * 1000), lambda _: None)
    other_entry = cache.get_or_build(other, fake_builder(b"y" * 1000), lambda _: None)
    if damage == "truncate":
        with open(entry.path, "r+b") as f:
            f.truncate(500)
    elif damage == "foreign":  # another engine of the same size copied over it
        with open(entry.path, "wb") as f:
            f.write(b"z" * 1000)
    elif damage == "drop record":  # an interrupted build: engine renamed, record not written
        os.remove(entry.path[: -len(".plan")] + ".json")
    else:
        os.replace(other_entry.path[: -len(".plan")] + ".json", entry.path[: -len(".plan")] + ".json")
    assert cache.problem(key) not in (None, "missing")
    if damage in ("truncate", "foreign"):
        with pytest.raises(EliteError, match="does not match its recorded sha256"):
            cache.read(entry)
    log, calls = [], []
    rebuilt = cache.get_or_build(key, fake_builder(b"x" * 1000, calls), log.append)
    assert len(calls) == 1 and "rebuilding" in log[0] and cache.problem(key) is None
    assert cache.read(rebuilt) == b"x" * 1000


def test_failed_build_leaves_nothing(tmp_path):
    cache, key = EngineCache(str(tmp_path)), make_key()

    def broken(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"half an eng")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.get_or_build(key, broken, lambda _: None)
    assert cache.problem(key) == "missing" and not leftovers(tmp_path)
    cache.get_or_build(key, fake_builder(b"ok"), lambda _: None)
    assert cache.problem(key) is None


def test_threads_building_one_key_build_once(tmp_path):
    cache, key, calls = EngineCache(str(tmp_path)), make_key(), []
    results = []

    def worker(tag: bytes) -> None:
        results.append(cache.get_or_build(key, fake_builder(tag, calls, delay=0.2), lambda _: None))

    threads = [threading.Thread(target=worker, args=(bytes([65 + i]) * 100,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({r.sha256 for r in results}) == 1
    assert cache.problem(key) is None and not leftovers(tmp_path)


def _build_in_process(root: str, tag: bytes, out) -> None:
    entry = EngineCache(root).get_or_build(make_key(), fake_builder(tag, delay=0.3), lambda _: None)
    out.put((entry.sha256, open(entry.path, "rb").read() == tag))


def test_processes_building_one_key_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), bytes([65 + i]) * 4096, out))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [out.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs)
    # one process built, the other found its entry: both return the same, valid engine
    assert len({sha for sha, _ in results}) == 1 and sorted(own for _, own in results) == [False, True]
    assert EngineCache(str(tmp_path)).problem(make_key()) is None and not leftovers(tmp_path)


def test_find_checks_trt_version_and_gpu_before_deserialising(tmp_path):
    cache = EngineCache(str(tmp_path))
    onnx = make_key().onnx
    with pytest.raises(EliteError, match="no TensorRT engine for unet") as e:
        cache.find("unet", onnx, "10.13.0.35", "9.0")
    assert REBUILD_HINT in str(e.value)
    old = cache.get_or_build(make_key(), fake_builder(b"old"), lambda _: None)
    with pytest.raises(EliteError, match=r"built with TensorRT 10.13.0.35 for GPU compute capability 9.0; this "
                                         r"host has TensorRT 10.14.1.48 on compute capability 9.0"):
        cache.find("unet", onnx, "10.14.1.48", "9.0")
    with pytest.raises(EliteError, match="compute capability 8.9"):
        cache.find("unet", onnx, "10.13.0.35", "8.9")
    with pytest.raises(EliteError, match="no TensorRT engine"):  # another bundle's graph
        cache.find("unet", OnnxFingerprint("f" * 64), "10.13.0.35", "9.0")
    assert cache.find("unet", onnx, "10.13.0.35", "9.0").path == old.path
    time.sleep(0.01)
    new = cache.get_or_build(make_key(settings=TrtBuildSettings(optimization_level=4).key_items()),
                             fake_builder(b"new"), lambda _: None)
    assert cache.find("unet", onnx, "10.13.0.35", "9.0").path == new.path  # newest wins
