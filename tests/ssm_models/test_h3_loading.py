"""Reading H3 checkpoints: our format (round trip), public ``model.pt`` state dicts in the current and
the old key naming (incl. the old post-norm layer order), Lightning ``.ckpt`` files, and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ssm_models import H3LM, H3Config, load_h3_checkpoint, load_pretrained
from tests.helpers import single_torch_thread

CONFIG = dict(d_model=16, n_layer=3, vocab_size=45, d_state=8, head_dim=2, attn_layer_idx=(1,), n_head=2)
IDS = torch.tensor([[1, 5, 9, 2, 44, 7, 7, 3]])


@pytest.fixture(autouse=True)
def _one_thread():
    with single_torch_thread():
        yield


def tiny_model(seed: int = 0) -> H3LM:
    torch.manual_seed(seed)
    model = H3LM(H3Config(**CONFIG)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def logits(model: H3LM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def public_state_dict(model: H3LM) -> dict[str, torch.Tensor]:
    """What ``SSMLMHeadModel.state_dict()`` holds: our names, with the tied ``lm_head.weight``."""
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architecture"] == "h3" and raw["attn_layer_idx"] == [1]
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, H3LM) and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embedding.weight
    assert torch.equal(logits(loaded), logits(model))
    assert H3LM.from_pretrained(tmp_path).config == model.config


def test_public_model_pt_with_load_h3_checkpoint(tmp_path: Path) -> None:
    model = tiny_model(1)
    torch.save(public_state_dict(model), tmp_path / "model.pt")
    for path in (tmp_path / "model.pt", tmp_path):
        assert torch.equal(logits(load_h3_checkpoint(path, H3Config(**CONFIG))), logits(model))


def test_our_config_with_public_weights_in_a_directory(tmp_path: Path) -> None:
    model = tiny_model(2)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(public_state_dict(model), tmp_path / "model.pt")
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(model))


def old_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The older public names: ``s4seq.encoder.`` for ``backbone.``, ``embedding.`` for the word
    embeddings, ``norm`` for ``ln_f``."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("backbone.embeddings.word_embeddings."):
            key = "embedding." + key[len("backbone.embeddings.word_embeddings."):]
        elif key.startswith("backbone.ln_f."):
            key = "s4seq.encoder.norm." + key[len("backbone.ln_f."):]
        elif key.startswith("backbone."):
            key = "s4seq.encoder." + key[len("backbone."):]
        renamed[key] = value
    return renamed


def post_norm_ordering(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The older layer order (``ln_0``; each LayerNorm one slot later; no ``ln_f``), written from the
    current one by hand: old ``ln_0`` = new ``layers.0.norm1``, old ``layers.i.norm1`` = new
    ``layers.i.norm2``, old ``layers.i.norm2`` = new ``layers.{i+1}.norm1`` (= ``ln_f`` for the last)."""
    old = {key: value for key, value in state.items() if ".norm1." not in key and ".norm2." not in key
           and not key.startswith("backbone.ln_f.")}
    for suffix in ("weight", "bias"):
        old[f"backbone.ln_0.{suffix}"] = state[f"backbone.layers.0.norm1.{suffix}"]
        for index in range(n_layer):
            old[f"backbone.layers.{index}.norm1.{suffix}"] = state[f"backbone.layers.{index}.norm2.{suffix}"]
            following = f"backbone.layers.{index + 1}.norm1" if index + 1 < n_layer else "backbone.ln_f"
            old[f"backbone.layers.{index}.norm2.{suffix}"] = state[f"{following}.{suffix}"]
    return old


def test_old_key_names_are_renamed(tmp_path: Path) -> None:
    model = tiny_model(3)
    state = old_naming(public_state_dict(model))
    assert any(key.startswith("s4seq.encoder.layers.") for key in state) and "embedding.weight" in state
    torch.save(state, tmp_path / "model.pt")
    assert torch.equal(logits(load_h3_checkpoint(tmp_path / "model.pt", H3Config(**CONFIG))), logits(model))


def test_old_post_norm_layer_order_is_converted(tmp_path: Path) -> None:
    model = tiny_model(4)
    state = old_naming(post_norm_ordering(public_state_dict(model), CONFIG["n_layer"]))
    torch.save(state, tmp_path / "old.pt")
    assert torch.equal(logits(load_h3_checkpoint(tmp_path / "old.pt", H3Config(**CONFIG))), logits(model))


class HyperParameters:
    """Stands for the objects Lightning pickles beside the weights; unpickling must never build it."""

    built: list[str] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: dict) -> None:
        HyperParameters.built.append("setstate")
        self.__dict__.update(state)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_lightning_checkpoint_with_pickled_objects(tmp_path: Path) -> None:
    model = tiny_model(5)
    checkpoint = {
        "pytorch-lightning_version": "1.8.6",
        "epoch": 3,
        "state_dict": {**{f"model.{key}": value for key, value in public_state_dict(model).items()},
                       "train_metrics.total": torch.zeros(())},
        "hyper_parameters": HyperParameters("h3"),
        "callbacks": {"ModelCheckpoint": {"best": HyperParameters("best")}},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = load_h3_checkpoint(tmp_path / "last.ckpt", H3Config(**CONFIG))
    assert torch.equal(logits(loaded), logits(model))
    assert HyperParameters.built == []
    # the same file inside a directory with our config.json
    H3LM(H3Config(**CONFIG)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(model))
    assert HyperParameters.built == []


@pytest.mark.parametrize("lightning", [False, True])
def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, lightning: bool) -> None:
    marker = tmp_path / "pwned"
    content = {"backbone.ln_f.weight": _RunsCode(marker)}
    if lightning:
        content = {"state_dict": public_state_dict(tiny_model()), "callbacks": content}
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        load_h3_checkpoint(tmp_path / "model.pt", H3Config(**CONFIG))
    assert not marker.exists()


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    model = tiny_model(6)
    torch.save(public_state_dict(model), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="shape"):
        load_h3_checkpoint(tmp_path / "model.pt", H3Config(**{**CONFIG, "d_state": 16}))
    with pytest.raises(ValueError, match="missing"):
        load_h3_checkpoint(tmp_path / "model.pt", H3Config(**{**CONFIG, "attn_layer_idx": ()}))
    with pytest.raises(ValueError, match="H3Config"):
        load_h3_checkpoint(tmp_path / "model.pt", CONFIG)
    with pytest.raises(ValueError, match="no such file"):
        load_h3_checkpoint(tmp_path / "nothing.pt", H3Config(**CONFIG))
    torch.save(public_state_dict(model), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="several"):
        load_h3_checkpoint(tmp_path, H3Config(**CONFIG))
    directory = tmp_path / "ours"
    model.save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "discretization": "euler"}))
    with pytest.raises(ValueError, match="discretization"):
        load_pretrained(directory)
