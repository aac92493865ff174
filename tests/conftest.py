"""Shared fixtures: one tiny ELITE per test session (per xdist worker), concept images, the oracle."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ROOT / "calib" / "concepts"
ORACLE_DIR = ROOT.parent / "shared" / "oracle"
ORACLE_FIXTURE = Path(os.environ.get("ELITE_ORACLE_FIXTURE",
                                     Path.home() / ".cache" / "elite-oracle" / "fixture"))


def assert_close(actual, expected, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """Like np.testing.assert_allclose, but says the max abs diff and where it is."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    diff = np.abs(a - e)
    bad = diff > atol + rtol * np.abs(e)
    if bad.any():
        where = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(f"{what}: max abs diff {diff.max():.3g} at {where} (actual {a[where]:.6g}, "
                             f"expected {e[where]:.6g}); {int(bad.sum())}/{bad.size} beyond atol={atol} rtol={rtol}")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    from elite_export.toy import make_toy

    return Path(make_toy(str(tmp_path_factory.mktemp("toy") / "elite"), seed=0))


@pytest.fixture(scope="session")
def toy_paths(toy_dir):
    from elite_export.checkpoints import CheckpointPaths

    return CheckpointPaths(str(toy_dir / "sd"), str(toy_dir / "image_encoder"),
                           str(toy_dir / "global_mapper.pt"), str(toy_dir / "local_mapper.pt"))


@pytest.fixture(scope="session")
def toy_models(toy_paths):
    from elite_export.checkpoints import load_models

    return load_models(toy_paths)


@pytest.fixture(scope="session")
def toy_pipeline(toy_models):
    from elite_export.pipeline import ElitePipeline

    return ElitePipeline(toy_models)


def concept_files(n: int = 7) -> tuple[str, str]:
    image = CONCEPTS / (f"{n}.png" if (CONCEPTS / f"{n}.png").exists() else f"{n}.jpg")
    return str(image), str(CONCEPTS / f"{n}_bg.png")


@pytest.fixture(scope="session")
def concept():
    from elite_export.runtime.preprocess import load_concept

    return load_concept(*concept_files(7))


@pytest.fixture(scope="session")
def oracle():
    """The authors' outputs on the visible oracle fixture; skipped where ../shared/oracle/setup.sh never ran."""
    npz = ORACLE_DIR / "expected_visible.npz"
    if not npz.exists() or not (ORACLE_FIXTURE / "local_mapper.pt").exists():
        pytest.skip("oracle fixture absent (run ../shared/oracle/setup.sh to build it)")
    return dict(np.load(npz)), ORACLE_FIXTURE


TOY_RANGES = {"batch": (1, 2, 3), "size": (256, 384, 512)}


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory) -> Path:
    """One toy bundle (fp32 + fp16) shared by every xdist worker: built once under a file lock."""
    import fcntl

    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.cli_bundle import toy_checkpoints
    from elite_export.specs import ShapeRanges

    base = tmp_path_factory.getbasetemp()  # xdist workers get <session>/popen-gwN: share <session>
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-toy-bundle"
    root.mkdir(exist_ok=True)
    bundle = root / "bundle"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (bundle / "manifest.json").exists():
            ranges = ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"])
            build_bundle(toy_checkpoints(str(bundle), 0), str(bundle), BuildOptions(ranges=ranges))
    return bundle


# Test files whose tests share one xdist worker under `make test` (--dist loadgroup), in file order:
# test_serve.py starts one HTTP service (Ray) for its module. xdist's own loadgroup reads the
# xdist_group mark through a nodeid suffix that pytest 9.2 ignores, so the grouping is by file here.
XDIST_FILE_GROUPS = {"tests/test_serve.py": "serve"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_FILE_GROUPS.get(nodeid.split("::")[0], super()._split_scope(nodeid))

    return FileGroupScheduling(config, log)
