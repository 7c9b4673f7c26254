"""Only the recipe decides how the model is compiled: ``accelerate launch`` fills the
ACCELERATE_DYNAMO_* environment from the user's default Accelerate config, which Accelerate's
TorchDynamoPlugin reads for every field it is not given."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from pipeline.config import load_config
from pipeline.ops.launch import dynamo_plugin

# What `accelerate launch` sets from a default config that asks for all of it.
ACCELERATE_DYNAMO = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "max-autotune",
                     "ACCELERATE_DYNAMO_USE_FULLGRAPH": "true", "ACCELERATE_DYNAMO_USE_DYNAMIC": "true",
                     "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true"}

# A process of its own: Accelerate keeps one state per process.
BUILD_RUN = r"""
import json, sys
from pipeline.config import load_config
from pipeline.data.prepared import open_prepared
from pipeline.train.run import build_run, describe

config = load_config(None, sys.argv[1:])
run = build_run(config, open_prepared(config.data.dir))
plugin = run.accelerator.state.dynamo_plugin
print(json.dumps({"backend": plugin.backend.value.lower(), "mode": plugin.mode, "fullgraph": plugin.fullgraph,
                  "dynamic": plugin.dynamic, "regional": plugin.use_regional_compilation,
                  "compile_kwargs": plugin.to_kwargs(), "line": describe(run).splitlines()[0]}))
"""


def test_the_dynamo_plugin_takes_nothing_from_the_environment(monkeypatch):
    for key, value in ACCELERATE_DYNAMO.items():
        monkeypatch.setenv(key, value)
    config = load_config(None, ["model.compile=true", "model.compile_backend=eager"])
    plugin = dynamo_plugin(config, compile_model=True)
    assert (plugin.backend.value, plugin.mode, plugin.fullgraph, plugin.dynamic, plugin.use_regional_compilation,
            plugin.options, plugin.disable) == ("EAGER", "default", False, None, False, None, False)
    assert plugin.to_kwargs() == {"backend": "eager"}  # torch.compile's defaults for all else
    assert dynamo_plugin(config, compile_model=False).backend.value == "NO"


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [True, False])
def test_accelerates_dynamo_environment_does_not_steer_compilation(tiny_data, tmp_path, compiled):
    """With every ACCELERATE_DYNAMO_* variable asking for something else, the run's accelerator
    compiles exactly as the recipe says (torch.compile's defaults where it says nothing), and
    the start-up line says that the recipe decides."""
    overrides = [f"data.dir={tiny_data}", f"output_dir={tmp_path}", "data.image_size=32", "data.batch_size=8",
                 "data.workers=0", f"model.compile={str(compiled).lower()}", "model.compile_backend=aot_eager",
                 "model.compile_mode=reduce-overhead"]
    result = subprocess.run([sys.executable, "-c", BUILD_RUN, *overrides], cwd=ROOT,
                            env={**subprocess_env(), **ACCELERATE_DYNAMO}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    print(seen["line"])
    assert (seen["backend"], seen["mode"]) == ("aot_eager" if compiled else "no", "reduce-overhead")
    assert (seen["fullgraph"], seen["dynamic"], seen["regional"]) == (False, None, False)
    if compiled:  # what prepare() passes to torch.compile
        assert seen["compile_kwargs"] == {"backend": "aot_eager", "mode": "reduce-overhead"}
        assert ("compiled (aot_eager, reduce-overhead) as the recipe says (model.compile), "
                "not ACCELERATE_DYNAMO_*") in seen["line"]
    else:
        assert "not compiled: the recipe's model.compile is false (ACCELERATE_DYNAMO_BACKEND=INDUCTOR not used)" \
            in seen["line"]
