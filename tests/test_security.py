"""Security defaults: nothing is unpickled, no remote code runs unless the config allows it,
checkpoints are safetensors and JSON, and a local Ray cluster keeps its dashboard on localhost
behind token authentication."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kimivl_rl.config import Config, ConfigError, load_config
from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("kimivl_rl", "sft", "bench", "scripts", "cluster")
# Imports that unpickle (or deserialise arbitrary objects) somewhere down the line.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def repo_files(*suffixes: str) -> list[Path]:
    """Tracked and untracked-but-not-ignored files of the repository (vendored data left out)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    files = [REPO / name for name in out if name and not name.startswith("tests/data/")]
    return [f for f in files if f.is_file() and (not suffixes or f.name.endswith(suffixes))]


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def unsafe_calls(source: str, library: bool = True) -> list[str]:
    """What in ``source`` could unpickle or run code it should not: one line per finding.

    Everywhere (tests too): ``torch.load`` without ``weights_only=True``, and
    ``trust_remote_code=True`` written literally (it must come from ``model.trust_remote_code``).
    In library code also: pickle-family imports, ``torch.save``, DeepSpeed's pickle checkpoints,
    numpy's ``allow_pickle=True``, PyYAML's unsafe loaders, and ``eval``/``exec``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load" and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                found.append(f"{line}: torch.load without weights_only=True")
            if _is_true(keywords.get("trust_remote_code", ast.Constant(None))):
                found.append(f"{line}: trust_remote_code=True")
            if library:
                if name == "torch.save" or name.endswith((".save_checkpoint", ".load_checkpoint")):
                    found.append(f"{line}: pickle checkpoint ({name})")  # DeepSpeed's pickles
                if _is_true(keywords.get("allow_pickle", ast.Constant(None))):
                    found.append(f"{line}: allow_pickle=True")
                if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                            "yaml.unsafe_load_all", "eval", "exec"):
                    found.append(f"{line}: {name}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    found.append(f"{line}: trust_remote_code=True")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_true(node.value or ast.Constant(None)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_dotted(t).endswith("trust_remote_code") for t in targets):
                found.append(f"{line}: trust_remote_code=True")
        elif library and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                     for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                    any(a.name in ("load", "save") for a in node.names):
                found.append(f"{line}: from torch import load/save")
            found += [f"{line}: import {name}" for name in names
                      if PICKLE_MODULES & set(name.split("."))]
            if isinstance(node, ast.ImportFrom) and node.module == "yaml" and \
                    any(a.name in ("load", "unsafe_load", "full_load", "Loader", "UnsafeLoader",
                                   "FullLoader") for a in node.names):
                found.append(f"{line}: unsafe yaml import")
    return found


# ----------------------------------------------------------------------------- (a) the code

@pytest.mark.parametrize("source, expected", [
    ("torch.load(f)", ["1: torch.load without weights_only=True"]),
    ("torch.load(f, weights_only=False)", ["1: torch.load without weights_only=True"]),
    ("torch.load(f, weights_only=True)", []),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", ["1: trust_remote_code=True"]),
    ("AutoModel.from_pretrained(p, trust_remote_code=cfg.model.trust_remote_code)", []),
    ("kw = {'trust_remote_code': True}", ["1: trust_remote_code=True"]),
    ("trust_remote_code = True", ["1: trust_remote_code=True"]),
    ("trust_remote_code: bool = False", []),
    ("import pickle", ["1: import pickle"]),
    ("from ray import cloudpickle", ["1: import ray.cloudpickle"]),
    ("from cloudpickle import loads", ["1: import cloudpickle.loads"]),
    ("from torch import load", ["1: from torch import load/save"]),
    ("torch.save(state, p)", ["1: pickle checkpoint (torch.save)"]),
    ("engine.save_checkpoint(d)", ["1: pickle checkpoint (engine.save_checkpoint)"]),
    ("np.load(p, allow_pickle=True)", ["1: allow_pickle=True"]),
    ("yaml.load(text)", ["1: yaml.load"]),
    ("yaml.safe_load(text)", []),
    ("from yaml import FullLoader", ["1: unsafe yaml import"]),
    ("eval(text)", ["1: eval"]),
    ("model.eval()", []),
])
def test_the_scanner_finds_what_it_looks_for(source, expected):
    assert unsafe_calls(source) == expected


def test_no_unsafe_loading_anywhere_in_the_code():
    files = repo_files(".py")
    assert len(files) > 40  # the scan sees the repository
    findings, from_config = [], 0
    for path in files:
        relative = path.relative_to(REPO)
        source = path.read_text(encoding="utf-8")
        library = relative.parts[0] in LIBRARY_DIRS
        findings += [f"{relative}:{f}" for f in unsafe_calls(source, library)]
        from_config += source.count("trust_remote_code=cfg.model.trust_remote_code")
    assert findings == []
    assert from_config >= 3  # model, processor and vLLM loading all take it from the config


def test_nothing_turns_off_vllm_or_ray_safety_switches():
    """No file sets VLLM_ALLOW_INSECURE_SERIALIZATION (pickled RPC payloads), and every
    RAY_AUTH_MODE anywhere (code, scripts, manifests, docs) is "token"."""
    auth_modes, insecure = [], []
    pattern = re.compile(r"RAY_AUTH_MODE[\"'\]\s]*[:=,]\s*[\"']?(\w+)")
    for path in repo_files():
        if path.name == Path(__file__).name:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(REPO)
        auth_modes += [(str(relative), m.group(1)) for m in pattern.finditer(text)]
        if "VLLM_ALLOW_INSECURE_SERIALIZATION" in text:
            insecure.append(str(relative))
    assert insecure == []
    assert auth_modes and {mode for _, mode in auth_modes} == {"token"}, auth_modes


# ----------------------------------------------------------------------------- (b) remote code

@pytest.fixture
def remote_code_model(tmp_path) -> tuple[Path, Path]:
    """A model directory whose config names custom code; the code, if ever imported, leaves a
    marker file behind."""
    model, marker = tmp_path / "evil-model", tmp_path / "CODE_RAN"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "kimivl_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForImageTextToText": "modeling_evil.EvilModel",
                     "AutoProcessor": "processing_evil.EvilProcessor"}}))
    code = textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from transformers import PretrainedConfig
        class EvilConfig(PretrainedConfig):
            model_type = "kimivl_evil"
        """)
    for name in ("configuration_evil.py", "modeling_evil.py", "processing_evil.py"):
        (model / name).write_text(code)
    return model, marker


def _config(model: Path, *overrides: str) -> Config:
    return load_config(None, [f"model.path={model}", *overrides])


def test_a_model_that_needs_custom_code_is_refused_by_default(remote_code_model):
    from kimivl_rl.models.loading import check_remote_code, load_policy
    from kimivl_rl.prepare import ensure_model

    model, marker = remote_code_model
    assert Config().model.trust_remote_code is False
    for attempt in (lambda: check_remote_code(str(model), False),
                    lambda: load_policy(str(model), _config(model)),
                    lambda: ensure_model(_config(model)),
                    lambda: ensure_model(_config(model, "model.init_if_missing=false"))):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert str(err.value) == (
            f"{model}: the model needs custom code from its directory (configuration_evil.py, "
            f"modeling_evil.py, processing_evil.py) and model.trust_remote_code is false; read "
            f"that code, and set model.trust_remote_code=true only if you trust it")
    assert not marker.exists()
    # With the setting the check stands aside (and still runs nothing itself).
    check_remote_code(str(model), True)
    assert not marker.exists()


def test_prepare_refuses_custom_code_with_exit_code_2(remote_code_model, tmp_path, capsys):
    from kimivl_rl import cli

    model, marker = remote_code_model
    code = cli.main(["prepare", "configs/tiny.yaml", f"model.path={model}",
                     f"data.dir={tmp_path}/data", "data.build_if_missing=false"])
    assert code == 2
    assert "model.trust_remote_code is false" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "data").exists()


def test_a_native_model_type_ignores_a_stray_auto_map(remote_code_model):
    """A known architecture loads with its transformers class: no refusal, no custom code."""
    from kimivl_rl.models.loading import check_remote_code

    model, marker = remote_code_model
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    check_remote_code(str(model), False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- (c) checkpoints

def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    import torch
    from safetensors import safe_open

    from kimivl_rl.infra.checkpoint import (MANIFEST, atomic_dir, load_state, save_state,
                                            verify_manifest)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "sampler": {"rates": [0.25, None], "seen": (1, 2)}, "step": 7}
    final = tmp_path / "iter_000007"
    with atomic_dir(final) as staging:
        save_state(model.state_dict(), staging / "weights")
        save_state(state, staging / "optimizer_rank0")
    verify_manifest(final)

    files = sorted(p.name for p in final.rglob("*") if p.is_file())
    assert files == [MANIFEST, "optimizer_rank0.json", "optimizer_rank0.safetensors",
                     "weights.json", "weights.safetensors"]
    for path in final.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # no pickle stream (protocol 2+)
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                assert len(list(f.keys())) > 0

    # What was written is what comes back, and a fresh optimizer accepts it.
    restored = load_state(final / "optimizer_rank0")
    assert restored["step"] == 7 and restored["sampler"] == {"rates": [0.25, None], "seen": (1, 2)}
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    weights = load_state(final / "weights")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", print, Path("/x")])
def test_checkpoints_refuse_what_only_pickle_could_store(tmp_path, value):
    from kimivl_rl.infra.checkpoint import save_state

    with pytest.raises(TypeError, match="cannot store .* in a checkpoint"):
        save_state({"ok": 1, "bad": value}, tmp_path / "state")


# ----------------------------------------------------------------------------- (d) Ray

def test_services_bind_to_localhost_by_default():
    assert Config().cluster.bind_host == "127.0.0.1"
    for path in sorted(REPO.glob("configs/*.yaml")):
        assert load_config(path).cluster.bind_host == "127.0.0.1", path.name


RAY_PROBE = """
import json, os, socket, sys, time, urllib.error, urllib.request
import psutil
from kimivl_rl.config import load_config
from kimivl_rl.infra.ray_runtime import init_ray

port = int(sys.argv[1])
init_ray(load_config(None, [f"cluster.dashboard_port={port}"]))
import ray
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

def get(headers):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code

deadline, listening = time.time() + 60, []
while not listening and time.time() < deadline:
    listening = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                        if c.status == "LISTEN" and c.laddr.port == port})
    time.sleep(0.5)
other_ips = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")})
reachable = {}
for ip in other_ips:
    with socket.socket() as s:
        s.settimeout(5)
        reachable[ip] = s.connect_ex((ip, port)) == 0
headers = get_auth_headers_if_auth_enabled({})
print("RESULT " + json.dumps({"listening": listening, "reachable": reachable,
                              "without_token": get({}), "with_token": get(headers),
                              "auth_headers": sorted(headers)}))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_cluster_keeps_its_dashboard_on_localhost_behind_a_token(tmp_path):
    [port] = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    result = subprocess.run([sys.executable, "-c", RAY_PROBE, str(port)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    probe = json.loads(lines[-1].removeprefix("RESULT "))
    assert probe["listening"] == ["127.0.0.1"]  # cluster.bind_host, the default
    assert not any(probe["reachable"].values()), probe["reachable"]
    assert probe["without_token"] == 401  # Ray 2.60 token authentication, left on
    assert probe["with_token"] == 200 and probe["auth_headers"] == ["authorization"]
