"""Every folder fedtune writes loads the Hugging Face ecosystem's way, offline, without fedtune.

One federated LoRA run on the tiny model (with output.merged and ftsim's baselines) and one
round each of full fine-tuning, IA3 and qlora give every kind of folder: a run's ``adapter/``,
``best/`` and a round checkpoint, ``baselines/alone/<site>/`` and ``baselines/pooled/``,
``merged/`` and full fine-tuning's ``model/``. A clean python process with the hub disabled
(``HF_HUB_OFFLINE=1``, an empty ``HF_HOME``) loads each as a user would,
``AutoPeftModelForCausalLM.from_pretrained(folder)`` or ``AutoModelForCausalLM.from_pretrained(folder)``
and nothing else (qlora: the BitsAndBytesConfig its fedtune_method.json describes), and its
logits on a fixed batch equal fteval's own loading of the folder to 1e-5. A copy whose
adapter_config.json names the base 'default' (what fedtune wrote before) fails the same load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.client import app as client_app
from fedtune.common import fteval, methods
from fedtune.common.checkpoint import ADAPTER_CONFIG
from fedtune.common.config import FedTuneConfig, ModelConfig, load_config
from fedtune.common.modeling import weights_sha256
from fedtune.server import app as server
from fedtune.simulations import baselines

from .test_baselines import federate
from .test_methods import method_config, real_sites

# Its module fixtures are built once, on one worker, not once per worker.
pytestmark = pytest.mark.xdist_group("ecosystem")

BATCH = [[1, 40, 41, 42, 43, 44, 45, 2], [1, 50, 51, 52, 53, 54, 55, 56]]

# What a user types, in a process that never imports fedtune. One process for every folder (the
# imports are most of its time); a folder that fails writes its traceback instead of logits.
ECOSYSTEM_LOADER = r"""
import json, sys, traceback
from pathlib import Path
import numpy as np, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

torch.set_num_threads(1)
jobs, batch = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
for folder, out, repack_off in jobs:
    try:
        folder = Path(folder)
        if (folder / "adapter_config.json").is_file():
            info = json.loads((folder / "fedtune_method.json").read_text())
            kw = {}
            if "quant_type" in info:  # qlora: its 4-bit base, as the method file describes it
                kw["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=info["quant_type"],
                    bnb_4bit_use_double_quant=info["double_quant"],
                )
            model = AutoPeftModelForCausalLM.from_pretrained(folder, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
        # bitsandbytes' AVX512-BF16 CPU path (its first inference repacks a 4-bit weight with
        # its scales in bf16): fedtune's own loading turns it off; so does a job that asks.
        layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        for m in layers if repack_off else []:
            m.support_avx512bf16_for_cpu = False
        bf16_path = any(m.support_avx512bf16_for_cpu for m in layers)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
        np.save(out + ".npy", logits.float().numpy())
        Path(out + ".json").write_text(json.dumps({"avx512bf16_path": bf16_path}))
    except Exception:
        Path(out + ".err").write_text(traceback.format_exc())
assert not any(m == "fedtune" or m.startswith("fedtune.") for m in sys.modules), "fedtune was imported"
"""

ADAPTERS = ["adapter", "best", "checkpoint", "alone-medical", "alone-financial", "pooled", "ia3", "qlora"]
MODELS = ["merged", "full-model"]


def tiny_config_64(model_dir: Path) -> FedTuneConfig:
    """conftest's tiny_config on the 64-wide tiny model (qlora needs it; the rest use it too)."""
    return FedTuneConfig.model_validate(
        {
            "model": {"name": str(model_dir), "device": "cpu", "dtype": "float32"},
            "peft": {"r": 4, "alpha": 8.0, "dropout": 0.0},
            "data": {"max_length": 192},
            "train": {"local_steps": 2, "batch_size": 2, "lr": 1e-3, "seed": 0},
            "eval": {"max_examples": 4, "batch_size": 4, "max_new_tokens": 4},
            "federation": {"rounds": 2},
        }
    )


def one_round(cfg: FedTuneConfig, method: str, out: Path) -> Path:
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    grid, _ = real_sites()
    server.run_federation(grid, method_config(cfg, method), out, lambda s: None)
    return out


@pytest.fixture(scope="module")
def folders(tiny_model_dir_64, tmp_path_factory) -> dict[str, Path | None]:
    """Every kind of folder fedtune writes, by name (qlora: None without bitsandbytes)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    saved = client_app._RUNTIME, client_app._SITE_CACHE
    try:
        base = tiny_config_64(tiny_model_dir_64)
        data = json.loads(base.to_json())
        data["output"]["merged"] = True
        client_app._RUNTIME, client_app._SITE_CACHE = None, {}
        cfg, run, rs = federate(load_config(None, base=data), tmp_path_factory.mktemp("lora-run"))
        baselines.run_baselines(cfg, run, rs.rounds, lambda s: None, "cpu")
        out = {
            "adapter": run / "adapter",
            "best": run / "best",
            "checkpoint": run / "checkpoints" / "round-0002",
            "alone-medical": run / "baselines" / "alone" / "medical",
            "alone-financial": run / "baselines" / "alone" / "financial",
            "pooled": run / "baselines" / "pooled",
            "merged": run / "merged",
            "full-model": one_round(base, "full", tmp_path_factory.mktemp("full-run")) / "model",
            "ia3": one_round(base, "ia3", tmp_path_factory.mktemp("ia3-run")) / "adapter",
        }
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:  # the qlora extra is not installed
            out["qlora"] = None
        else:
            out["qlora"] = one_round(base, "qlora", tmp_path_factory.mktemp("qlora-run")) / "adapter"
        return out
    finally:
        client_app._RUNTIME, client_app._SITE_CACHE = saved
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


def ecosystem_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHONPATH"))}
    return env | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home),  # empty: nothing cached helps
        "OMP_NUM_THREADS": "1",
    }


def load_the_ecosystem_way(jobs: dict[str, tuple[Path, bool]], work: Path) -> dict[str, dict]:
    """Each folder (name -> (folder, whether to turn bitsandbytes' AVX512-BF16 path off)) loaded
    in one clean subprocess: name -> {"logits": its logits on BATCH, or "error": the traceback it
    failed with; "avx512bf16_path": whether bitsandbytes' bf16 repack was on}."""
    home, outs = work / "hf-home", work / "logits"
    home.mkdir()
    outs.mkdir()
    argv = [[str(folder), str(outs / name), off] for name, (folder, off) in jobs.items()]
    proc = subprocess.run(
        [sys.executable, "-c", ECOSYSTEM_LOADER, json.dumps(argv), json.dumps(BATCH)],
        cwd=work,  # not the repository: nothing of fedtune's on the path
        env=ecosystem_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not any(home.rglob("*.safetensors"))  # nothing was fetched
    got = {}
    for name in jobs:
        if (outs / f"{name}.npy").is_file():
            got[name] = {"logits": np.load(outs / f"{name}.npy"), **json.loads((outs / f"{name}.json").read_text())}
        else:
            got[name] = {"error": (outs / f"{name}.err").read_text()}
    return got


@pytest.fixture(scope="module")
def ecosystem(folders, tmp_path_factory) -> dict[str, dict]:
    """Every folder loaded the ecosystem's way; 'qlora-bf16-path-off': qlora with bitsandbytes'
    AVX512-BF16 path turned off, as fedtune loads it; 'default-named': a copy of adapter/ whose
    adapter_config.json names the base 'default', as fedtune wrote it before."""
    work = tmp_path_factory.mktemp("ecosystem")
    stale = work / "default-named"
    shutil.copytree(folders["adapter"], stale)
    config = json.loads((stale / ADAPTER_CONFIG).read_text())
    (stale / ADAPTER_CONFIG).write_text(json.dumps(config | {"base_model_name_or_path": "default"}))
    jobs = {name: (folder, False) for name, folder in folders.items() if folder is not None}
    if folders["qlora"] is not None:
        jobs["qlora-bf16-path-off"] = (folders["qlora"], True)
    return load_the_ecosystem_way(jobs | {"default-named": (stale, False)}, work)


def fedtune_logits(folder: Path) -> np.ndarray:
    """The folder loaded as fteval loads it: an adapter on fteval's base_of it (qlora on its 4-bit
    base, as fedtune_method.json says); a model folder as the base (``fteval --model``)."""
    if (folder / ADAPTER_CONFIG).is_file():
        model = methods.load_trained(ModelConfig(name=fteval.base_of(str(folder))), folder, "cpu")[0]
    else:
        model = methods.load_trained(ModelConfig(name=str(folder)), None, "cpu")[0]
    model.eval()
    x = torch.tensor(BATCH)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float().numpy()


def loaded(ecosystem, name: str, folder: Path) -> np.ndarray:
    got = ecosystem[name]
    assert "error" not in got, f"{folder} does not load the ecosystem's way offline:\n{got.get('error')}"
    assert got["logits"].shape[:2] == (len(BATCH), len(BATCH[0]))
    return got["logits"]


@pytest.mark.parametrize("name", [n for n in ADAPTERS + MODELS if n != "qlora"])
def test_every_folder_loads_the_ecosystem_way_offline_to_fteval_s_outputs(name, folders, ecosystem):
    diff = np.abs(loaded(ecosystem, name, folders[name]) - fedtune_logits(folders[name])).max()
    assert diff <= 1e-5, diff


@pytest.fixture
def qlora(folders):
    if folders["qlora"] is None:
        pytest.skip("qlora needs bitsandbytes (the qlora extra)")
    return folders["qlora"]


def test_a_qlora_adapter_loads_on_its_4bit_base_to_fteval_s_outputs(qlora, ecosystem):
    """With the BitsAndBytesConfig its fedtune_method.json describes, and bitsandbytes'
    AVX512-BF16 repack off as fedtune's own loading has it, the outputs are fteval's."""
    diff = np.abs(loaded(ecosystem, "qlora-bf16-path-off", qlora) - fedtune_logits(qlora)).max()
    assert diff <= 1e-5, diff


def test_a_qlora_adapter_loads_as_is(qlora, ecosystem):
    """Loaded with nothing but its BitsAndBytesConfig: the same outputs, except where bitsandbytes
    takes its AVX512-BF16 CPU path (its first inference repacks each 4-bit weight with the scales
    rounded to bf16), which fedtune's loading turns off (modeling._one_cpu_4bit_path)."""
    got = loaded(ecosystem, "qlora", qlora)
    diff = np.abs(got - fedtune_logits(qlora)).max()
    if ecosystem["qlora"]["avx512bf16_path"] and diff > 1e-5:
        assert diff < 0.5  # the rounding of the scales, not another model
        pytest.xfail(f"bitsandbytes' AVX512-BF16 CPU path rounds the 4-bit scales to bf16: max diff {diff:.3g}")
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name", ADAPTERS)
def test_an_adapter_names_its_base_by_a_path_that_exists_and_records_its_digest(name, folders, tiny_model_dir_64):
    folder = folders[name]
    if folder is None:
        pytest.skip("qlora needs bitsandbytes (the qlora extra)")
    named = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    assert named != "default" and Path(named).is_absolute() and Path(named).is_dir()
    assert Path(named) == tiny_model_dir_64.resolve()
    info = methods.read_method_info(folder)
    assert info["base_model"] == str(tiny_model_dir_64)  # as the config named it
    assert info["base_path"] == named and info["base_sha256"] == weights_sha256(named)


@pytest.mark.parametrize("name", MODELS)
def test_a_model_folder_is_a_plain_model(name, folders):
    folder = folders[name]
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert not (folder / ADAPTER_CONFIG).exists()


def test_an_adapter_that_names_its_base_default_does_not_load_offline(ecosystem):
    """The harness sees the failure the issue reports: 'default' sends peft to the hub."""
    err = ecosystem["default-named"].get("error")
    assert err is not None and "couldn't connect to 'https://huggingface.co'" in err, ecosystem["default-named"]


def test_a_relative_model_path_is_named_absolutely(tiny_model_dir_64, monkeypatch):
    """A base named relative to where the run started still resolves from anywhere else."""
    monkeypatch.chdir(tiny_model_dir_64.parent)
    ref = methods.base_reference(ModelConfig(name=tiny_model_dir_64.name))
    assert ref == str(tiny_model_dir_64.resolve())
