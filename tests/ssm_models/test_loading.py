"""save_pretrained / load_pretrained in both key namings, hub ids from the local cache,
`transformers` reading our HF-format save, and refusal of pickles that run code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers

from ssm_models import MambaConfig, MambaLM, from_hf, load_pretrained
from tests.helpers import random_hf_mamba, relative_error


def tiny_model(seed: int = 0, **overrides) -> MambaLM:
    torch.manual_seed(seed)
    fields = dict(d_model=16, n_layer=2, vocab_size=37, d_state=4, pad_vocab_size_multiple=8)
    fields.update(overrides)
    return MambaLM(MambaConfig(**fields)).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


IDS = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key_naming", ["state-spaces", "hf"])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path: Path, key_naming: str, tie: bool) -> None:
    model = tiny_model(tie_embeddings=tie)
    model.save_pretrained(tmp_path, key_naming=key_naming)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path)
    assert loaded.config.padded_vocab_size == model.config.padded_vocab_size == 40
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_hf_format_save_is_read_by_transformers(tmp_path: Path) -> None:
    model = tiny_model(3)
    model.save_pretrained(tmp_path, key_naming="hf")
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert relative_error(logits(hf, IDS), logits(model, IDS)) <= 1e-5


def test_transformers_save_is_read_by_us(tmp_path: Path) -> None:
    hf = random_hf_mamba(1)
    hf.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, 40, (2, 9))
    assert relative_error(logits(loaded, ids), logits(hf, ids)) <= 1e-5


def test_state_spaces_pytorch_model_bin(tmp_path: Path) -> None:
    """A state-spaces checkpoint as mamba_ssm writes it: config.json with ssm_cfg, and
    pytorch_model.bin with `backbone.embedding.weight` and an explicit `lm_head.weight`."""
    model = tiny_model(2)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert "backbone.embedding.weight" in state and "lm_head.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {
        "d_model": 16, "n_layer": 2, "vocab_size": 37, "ssm_cfg": {"d_state": 4},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path)
    assert loaded.config.d_state == 4 and loaded.config.padded_vocab_size == 40
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_hub_id_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves through huggingface_hub's cache layout without any network."""
    model = tiny_model(4)
    snapshot = tmp_path / "hub" / "models--someone--tiny-mamba" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot, key_naming="hf")
    refs = tmp_path / "hub" / "models--someone--tiny-mamba" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = load_pretrained("someone/tiny-mamba")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    with pytest.raises(ValueError, match="someone/absent"):
        load_pretrained("someone/absent")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"backbone.embedding.weight": _RunsCode()}, handle)
    with pytest.raises(ValueError, match="refusing to load"):
        load_pretrained(tmp_path)


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a hub id"):
        load_pretrained(tmp_path / "does" / "not" / "exist")
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)
    model = tiny_model()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["d_model"] = 24
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(tmp_path)


def test_load_with_dtype(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert logits(loaded, IDS).dtype == torch.float64


def test_from_hf_then_save(tmp_path: Path) -> None:
    hf = random_hf_mamba(2)
    from_hf(hf).save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, 40, (1, 6))
    assert relative_error(logits(loaded, ids), logits(hf, ids)) <= 1e-5
