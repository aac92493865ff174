"""The service's setup without starting Ray: the config file, the application builder, one-line errors
before Ray starts, elite-run without the serve extra, no torch in the service's imports."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ROOT
from elite_export.runtime.cli import main as elite_run

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name, name=name)
sys.meta_path.insert(0, Block())
"""


def test_elite_run_serve_without_the_extra_says_how_to_install_it(toy_bundle, tmp_path):
    code = BLOCK.format(blocked=("ray",)) + f"""
from elite_export.runtime.cli import main
main(['serve', '--bundle', {str(toy_bundle)!r}, '--port', '0'])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: elite-run serve needs the serve extra (ray is not installed): "
                                   "pip install 'elite-export[serve]'")


def test_the_service_imports_no_torch(tmp_path):
    pytest.importorskip("ray.serve")
    code = BLOCK.format(blocked=("torch", "diffusers", "transformers")) + """
import elite_export.runtime.serve.app, elite_export.runtime.serve.launch, elite_export.runtime.cli
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("extra,message", [
    (["--max-batch", "5"], "--max-batch 5 is more than this bundle takes (3)"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--timeout-s", "nan"], "--timeout-s must be a positive number"),
    (["--bundle", "/no/such/bundle"], "does not exist"),
])
def test_bad_options_are_one_line_before_ray_starts(toy_bundle, extra, message):
    args = {"--bundle": str(toy_bundle), "--port": "0"}
    args.update(zip(extra[::2], extra[1::2]))
    result = CliRunner().invoke(elite_run, ["serve", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_a_busy_port_is_one_line(toy_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(elite_run, ["serve", "--bundle", str(toy_bundle), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.output


def test_the_config_file_is_a_valid_serve_config_for_the_builder(toy_bundle):
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve import Application
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    from elite_export.runtime.serve.app import build

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text()))
    (app_config,) = config.applications
    assert app_config.import_path == "elite_export.runtime.serve.app:build"
    module, name = app_config.import_path.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is build
    args = {**app_config.args, "bundle": str(toy_bundle), "backend": "onnxruntime", "max_batch": 3}
    app = build(args)
    assert isinstance(app, Application)
    built = {d.name: d for d in build_app(app, name="elite").deployments}
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"}
                 for d in app_config.model_dump(exclude_unset=True)["deployments"]}
    assert set(overrides) == set(built) == {"EliteService", "ConceptStore"}
    assert overrides["EliteService"]["ray_actor_options"]["num_gpus"] == 1
    for name, options in overrides.items():  # the config's settings apply to the code's deployments
        built[name].options(**options)
    service = built["EliteService"].options(**overrides["EliteService"])
    assert service.ray_actor_options["num_gpus"] == 1 and service.max_ongoing_requests == 36
    from elite_export.errors import EliteError

    with pytest.raises(EliteError, match="--precision must be one of auto, fp32, fp16, cuda, not 'fp8'"):
        build({**args, "precision": "fp8"})
    with pytest.raises(EliteError, match="unknown service option"):
        build({**args, "colour": "red"})
    with pytest.raises(EliteError, match="needs `bundle`"):
        build({})
