"""Explain a ``transformers`` ``MambaForCausalLM`` checkpoint directory with MambaLRP and baselines.

    python demos/explain_hf_checkpoint.py path/to/checkpoint --text "some text"
    python demos/explain_hf_checkpoint.py                 # builds a small random checkpoint first
    python demos/explain_hf_checkpoint.py --out heatmap.html --methods mamba_lrp,integrated_gradients

The directory is what ``MambaForCausalLM.save_pretrained`` plus the tokenizer's
``save_pretrained`` write (e.g. a ``state-spaces/mamba-130m-hf`` download). Without one (no hub is
needed), the script builds a small ``MambaForCausalLM`` with random weights and the word-level
tokenizer of the built-in ``sentiment`` task, saves both to ``--save-to`` (default: a temporary
folder) and explains that; its explanations are of an untrained model, so only their form means
anything.

The model is loaded with ``transformers`` and handed to :func:`mamba_lrp.explain` as it is (it is
converted to our ``MambaLM`` without copying its weights); every method explains the logit of the
first method's top prediction at the last position. Heatmaps go to the terminal, and with
``--out FILE.html`` into one self-contained page on one shared colour scale.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

DEFAULT_TEXT = "the film was never boring and the acting was really good . the review is"


def build_random_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Save a small random ``MambaForCausalLM`` (hidden 32, 2 layers) and a word-level tokenizer."""
    import transformers

    from mamba_lrp import get_task

    task = get_task("sentiment")
    config = transformers.MambaConfig(vocab_size=task.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      state_size=8, expand=2, conv_kernel=4, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(config)
    model.save_pretrained(directory)
    task.save_tokenizer(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a MambaForCausalLM checkpoint directory with its tokenizer (default: build a small "
                             "random one)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help=f"the text to explain (default: {DEFAULT_TEXT!r})")
    parser.add_argument("--methods", default="mamba_lrp,gradient_x_input,integrated_gradients",
                        help="comma-separated methods (default: mamba_lrp,gradient_x_input,integrated_gradients)")
    parser.add_argument("--out", default=None, help="also write the heatmaps to FILE.html (default: none)")
    parser.add_argument("--save-to", default=None,
                        help="where the random checkpoint is saved (default: a temporary folder)")
    arguments = parser.parse_args(argv)

    import transformers

    from mamba_lrp import explain, viz

    if arguments.checkpoint is None:
        directory = Path(arguments.save_to or tempfile.mkdtemp(prefix="random_mamba_"))
        build_random_checkpoint(directory)
        print(f"no checkpoint given: saved a small random MambaForCausalLM to {directory}")
    else:
        directory = Path(arguments.checkpoint)
    model = transformers.MambaForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)

    explanations = {}
    target = None
    for method in [name.strip() for name in arguments.methods.split(",") if name.strip()]:
        explanation = explain(model, arguments.text, target=target, method=method, tokenizer=tokenizer)
        target = int(explanation.target)
        explanations[method] = explanation
    token = tokenizer.convert_ids_to_tokens(target)
    print(f"explaining the logit of {token!r} (id {target}) after: {arguments.text!r}")
    scale = max(float(explanation.relevance.abs().max()) for explanation in explanations.values())
    for method, explanation in explanations.items():
        viz.print_heatmap(explanation, name=method, scale=scale)
    if arguments.out:
        page = viz.html_document(viz.html_comparison(explanations), title=f"{directory.name}: {arguments.text}")
        print(f"wrote {viz.write_text_atomic(arguments.out, page, force=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
