"""Loading and saving models: public checkpoints, ``transformers`` models, our own directories.

Formats read by :func:`load_pretrained` (REFERENCE.md section 1):

* **state-spaces** (``mamba_ssm``): ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg,
  pad_vocab_size_multiple, tie_embeddings, ...``; keys ``backbone.embedding.weight``, ...
* **Hugging Face** (``transformers`` ``MambaForCausalLM``): ``config.json`` with ``hidden_size,
  num_hidden_layers, state_size, ...``; keys ``backbone.embeddings.weight``, ...; ``lm_head.weight``
  may be absent (tied).

Weights come from ``*.safetensors`` (also sharded with an index) or ``pytorch_model.bin`` read
with ``torch.load(weights_only=True)``: a pickle that would run code is refused. Hub ids go through
``huggingface_hub.snapshot_download`` and fall back to its local cache when offline.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssm_models.lm_base import SequenceLM
from ssm_models.mamba import MambaConfig, MambaLM

KEY_NAMINGS = ("state-spaces", "hf")
_WEIGHT_PATTERNS = [
    "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json"
]


# --------------------------------------------------------------------------- configs
def config_from_state_spaces(raw: dict[str, Any]) -> MambaConfig:
    """A :class:`MambaConfig` from a state-spaces ``config.json`` dict (or our own saved one)."""
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba"):
        raise ValueError(f"config.json: ssm_cfg.layer={layer!r} is not supported (only Mamba1)")
    if raw.get("rms_norm", True) is False:
        raise ValueError("config.json: rms_norm=false (LayerNorm Mamba) is not supported")
    if raw.get("attn_layer_idx"):
        raise ValueError("config.json: hybrid Mamba/attention checkpoints (attn_layer_idx) are not supported")
    fields = {
        "d_model": raw["d_model"],
        "n_layer": raw["n_layer"],
        "vocab_size": raw["vocab_size"],
        "pad_vocab_size_multiple": raw.get("pad_vocab_size_multiple", 8),
        "tie_embeddings": raw.get("tie_embeddings", True),
        "residual_in_fp32": raw.get("residual_in_fp32", True),
        "norm_eps": raw.get("norm_epsilon", raw.get("norm_eps", 1e-5)),
    }
    ssm_keys = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max", "dt_init")
    ssm_keys += ("dt_scale", "dt_init_floor")
    fields.update({key: ssm_cfg[key] for key in ssm_keys if key in ssm_cfg})
    return MambaConfig(**fields)


def config_to_state_spaces(config: MambaConfig) -> dict[str, Any]:
    ssm_keys = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max", "dt_init")
    ssm_keys += ("dt_scale", "dt_init_floor")
    return {
        "architecture": "mamba",
        "d_model": config.d_model,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {"layer": "Mamba1", **{key: getattr(config, key) for key in ssm_keys}},
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
        "norm_epsilon": config.norm_eps,
    }


def config_from_hf(raw: dict[str, Any]) -> MambaConfig:
    """A :class:`MambaConfig` from a ``transformers`` ``MambaConfig`` (object or its dict)."""
    if not isinstance(raw, dict):
        raw = raw.to_dict()
    hidden = raw["hidden_size"]
    expand = raw.get("expand", 2)
    intermediate = raw.get("intermediate_size", expand * hidden)
    if intermediate != expand * hidden:
        raise ValueError(f"config: intermediate_size={intermediate} is not expand*hidden_size={expand * hidden}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config: hidden_act={act!r} is not supported (Mamba uses 'silu')")
    return MambaConfig(
        d_model=hidden,
        n_layer=raw["num_hidden_layers"],
        vocab_size=raw["vocab_size"],
        d_state=raw.get("state_size", 16),
        expand=expand,
        d_conv=raw.get("conv_kernel", 4),
        dt_rank=raw.get("time_step_rank", "auto"),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        pad_vocab_size_multiple=1,
        tie_embeddings=raw.get("tie_word_embeddings", True),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        dt_min=raw.get("time_step_min", 0.001),
        dt_max=raw.get("time_step_max", 0.1),
        dt_init=raw.get("time_step_init_scheme", "random"),
        dt_scale=raw.get("time_step_scale", 1.0),
        dt_init_floor=raw.get("time_step_floor", 1e-4),
        initializer_range=raw.get("initializer_range", 0.02),
        rescale_prenorm_residual=raw.get("rescale_prenorm_residual", False),
    )


def config_to_hf(config: MambaConfig) -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers.MambaForCausalLM.from_pretrained`` reads."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "state_size": config.d_state,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "conv_kernel": config.d_conv,
        "time_step_rank": config.resolved_dt_rank,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_init_scheme": config.dt_init,
        "time_step_scale": config.dt_scale,
        "time_step_floor": config.dt_init_floor,
        "initializer_range": config.initializer_range,
        # transformers re-applies this init to loaded out_proj weights; it only matters for fresh models
        "rescale_prenorm_residual": False,
    }


# ---------------------------------------------------------------------- state dicts
def _hf_to_state_spaces_key(key: str) -> str:
    return "backbone.embedding.weight" if key == "backbone.embeddings.weight" else key


def _state_spaces_to_hf_key(key: str) -> str:
    return "backbone.embeddings.weight" if key == "backbone.embedding.weight" else key


def load_state_dict_into(
    model: SequenceLM,
    state_dict: dict[str, torch.Tensor],
    source: str,
    assign: bool = False,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Load a state dict into ``model``; a missing ``lm_head.weight`` means tied. ``rename`` maps
    checkpoint keys to ours (default: Mamba's Hugging Face names to state-spaces names).

    Raises ``ValueError`` listing missing or unexpected keys, or mismatched shapes.
    """
    rename = _hf_to_state_spaces_key if rename is None else rename
    state = {rename(key): value for key, value in state_dict.items()}
    tied = bool(getattr(model.config, "tie_embeddings", False))
    embedding_key = next(name for name, parameter in model.named_parameters() if parameter is model.embedding.weight)
    if tied:
        head = state.pop("lm_head.weight", None)
        embedding = state.get(embedding_key)
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ValueError(f"{source}: the config ties the head to the embedding, but lm_head.weight differs")
    expected = {key: value for key, value in model.state_dict().items() if not (tied and key == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: state dict does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=assign)
    if tied:
        model.lm_head.weight = model.embedding.weight


class _Unpicklable:
    """Stand-in for a class or function named in a training checkpoint outside its ``state_dict``
    (Lightning's hyper-parameters, loop states, ...): accepts any construction and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_training_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint whose non-tensor entries name other globals:
    each such global is replaced by :class:`_Unpicklable`, so no code of the file runs. Returns None
    unless the result holds a ``state_dict`` dict (a Lightning or training checkpoint)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stubs = [(type(name.rsplit(".", 1)[-1], (_Unpicklable,), {}), name) for name in names]
        with torch.serialization.safe_globals(stubs):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return loaded if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict) else None


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors, or a ``torch.save`` file read with
    ``weights_only=True`` (a plain state dict, or a training/Lightning checkpoint whose
    ``state_dict`` entry is taken; its other entries are never executed)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        loaded = _load_training_checkpoint(path)
        if loaded is None:
            raise ValueError(
                f"refusing to load {path}: it is not a plain tensor file (torch.load(weights_only=True) rejected "
                f"it, so it may run code when unpickled): {str(error).splitlines()[0]}"
            ) from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return loaded


_SINGLE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: ``path`` is a weight file, or a directory searched for
    safetensors (single or sharded), then ``pytorch_model.bin``, then a single ``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.pth`` or ``*.ckpt`` file (public H3 checkpoints are a ``model.pt``)."""
    path = Path(path)
    if path.is_file():
        return _read_weight_file(path)
    directory = path
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(directory / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_weight_file(directory / name)
    for suffix in _SINGLE_FILE_SUFFIXES:
        candidates = sorted(directory.glob(f"*{suffix}"))
        if len(candidates) == 1:
            return _read_weight_file(candidates[0])
        if len(candidates) > 1:
            raise ValueError(f"{directory}: several {suffix} files {[c.name for c in candidates]}; pass one file")
    raise ValueError(f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin, or one "
                     f"*.pt / *.ckpt file)")


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """How to build and read one model family that is saved in our own format: ``config.json``
    holds ``{"architecture": name, **config fields}``. ``config_from_dict`` turns that dict into
    the config (raising ``ValueError`` naming a bad field), ``build`` makes the model from it, and
    ``rename_key`` maps public checkpoint key namings to ours (identity by default)."""

    name: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], SequenceLM]
    rename_key: Callable[[str], str] = field(default=lambda key: key)
    prepare_state_dict: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = field(default=lambda s: s)


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture) -> None:
    """Make ``load_pretrained`` read checkpoints whose config names ``architecture.name``."""
    _ARCHITECTURES[architecture.name] = architecture


def architecture_names() -> list[str]:
    """Every registered architecture, ``mamba`` first."""
    return ["mamba", *sorted(name for name in _ARCHITECTURES if name != "mamba")]


def get_architecture(name: str) -> Architecture:
    """The registered :class:`Architecture` ``name`` (``ValueError`` listing the known ones)."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(architecture_names())}")
    return _ARCHITECTURES[name]


def _load_registered(directory: Path, raw: dict[str, Any], architecture: Architecture) -> SequenceLM:
    fields = {key: value for key, value in raw.items() if key != "architecture"}
    try:
        config = architecture.config_from_dict(fields)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{directory / 'config.json'}: not a valid {architecture.name} config ({error})") from None
    state = architecture.prepare_state_dict(read_state_dict(directory))
    with torch.device("meta"):
        model = architecture.build(config)
    load_state_dict_into(model, state, source=str(directory), assign=True, rename=architecture.rename_key)
    return model


# --------------------------------------------------------------------------- public
def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory for ``path_or_hub_id``: the directory itself, or a hub snapshot
    (downloaded, or found in the local Hugging Face cache when the hub cannot be reached)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"`path_or_hub_id`: {text!r} is neither a checkpoint directory nor a hub id 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_WEIGHT_PATTERNS, local_files_only=True))
    except Exception:  # not cached: try the hub itself
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as error:
        raise ValueError(
            f"`path_or_hub_id`: could not get hub model {text!r} (not in the local cache, and the hub "
            f"cannot be reached or has no such model): {type(error).__name__}"
        ) from None


def detect_key_naming(raw_config: dict[str, Any]) -> str:
    if "d_model" in raw_config:
        return "state-spaces"
    if "hidden_size" in raw_config or raw_config.get("model_type") == "mamba":
        return "hf"
    raise ValueError(
        "config.json: neither a state-spaces config (d_model) nor a Hugging Face Mamba config (hidden_size)"
    )


def load_pretrained(
    path_or_hub_id: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> SequenceLM:
    """Load a model from a checkpoint directory or hub id: Mamba in the state-spaces or Hugging Face
    format, or any registered architecture (H3, B'MOJO) in our format (``architecture`` field).

    ``dtype``: cast the weights (default: as stored). Raises ``ValueError`` with the reason when
    the directory, its config or its weights cannot be used.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    architecture = raw.get("architecture", "mamba")
    if architecture != "mamba":
        if architecture not in _ARCHITECTURES:
            raise ValueError(f"{config_path}: unknown architecture {architecture!r}; known: {architecture_names()}")
        model = _load_registered(directory, raw, _ARCHITECTURES[architecture])
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    naming = detect_key_naming(raw)
    try:
        config = config_from_state_spaces(raw) if naming == "state-spaces" else config_from_hf(raw)
    except KeyError as error:
        raise ValueError(f"{config_path}: missing field {error}") from None
    state = read_state_dict(directory)
    with torch.device("meta"):
        model = MambaLM(config)
    load_state_dict_into(model, state, source=str(directory), assign=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


def save_pretrained(model: SequenceLM, directory: str | Path, key_naming: str = "state-spaces") -> Path:
    """Write ``config.json`` and ``model.safetensors``. A Mamba model is written in ``key_naming``
    (``"state-spaces"``, or ``"hf"``, which ``transformers.MambaForCausalLM.from_pretrained`` also
    reads); other architectures in our format (``{"architecture": name, **config}``, our keys).
    Files are written to temporary names and renamed, so an interrupted save leaves no half file."""
    if not isinstance(model, MambaLM):
        return _save_registered(model, Path(directory))
    if key_naming not in KEY_NAMINGS:
        raise ValueError(f"`key_naming` must be one of {KEY_NAMINGS}, got {key_naming!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    rename = (lambda key: key) if key_naming == "state-spaces" else _state_spaces_to_hf_key
    state = {
        rename(key): value.detach().contiguous().cpu()
        for key, value in model.state_dict().items()
        if not (config.tie_embeddings and key == "lm_head.weight")
    }
    raw = config_to_state_spaces(config) if key_naming == "state-spaces" else config_to_hf(config)
    _atomic_write(directory / "model.safetensors", lambda path: save_file(state, path, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda path: Path(path).write_text(json.dumps(raw, indent=2) + "\n"))
    return directory


def _save_registered(model: SequenceLM, directory: Path) -> Path:
    config = model.config
    if config.architecture not in _ARCHITECTURES:
        raise ValueError(f"cannot save a {type(model).__name__}: architecture {config.architecture!r} is unknown")
    directory.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(config, "tie_embeddings", False))
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()
             if not (tied and key == "lm_head.weight")}
    raw = {"architecture": config.architecture, **{k: v for k, v in config.to_dict().items() if k != "architecture"}}
    _atomic_write(directory / "model.safetensors", lambda path: save_file(state, path, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda path: Path(path).write_text(json.dumps(raw, indent=2) + "\n"))
    return directory


def _atomic_write(target: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def from_hf(hf_model: torch.nn.Module, share_weights: bool = True) -> MambaLM:
    """Our :class:`MambaLM` from a ``transformers`` ``MambaForCausalLM`` (any config).

    With ``share_weights`` (default) our parameters share storage with the user's model (no copy;
    the user's model object itself is never modified); otherwise the weights are cloned.
    """
    config = getattr(hf_model, "config", None)
    if config is None or getattr(config, "model_type", None) != "mamba" or not hasattr(hf_model, "lm_head"):
        raise ValueError(f"`hf_model` must be a transformers MambaForCausalLM, got {type(hf_model).__name__}")
    our_config = config_from_hf(config)
    state = {key: (value if share_weights else value.clone()) for key, value in hf_model.state_dict().items()}
    dtype = hf_model.lm_head.weight.dtype
    with torch.device("meta"):
        model = MambaLM(our_config)
    load_state_dict_into(model, state, source=type(hf_model).__name__, assign=True)
    return model.to(device=hf_model.lm_head.weight.device, dtype=dtype)


#: Mamba is read and written in its public namings above; the entry serves building by name
#: (``get_architecture("mamba").build(...)``), as for every other architecture.
register_architecture(Architecture(name="mamba", config_from_dict=lambda raw: MambaConfig(**raw), build=MambaLM))
