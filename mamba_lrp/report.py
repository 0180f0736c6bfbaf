"""Reports: one self-contained HTML page of explanations and their faithfulness, plus ``results.json``.

:func:`write_report` writes two files into ``out_dir``:

* ``report.html``: inline CSS, figures embedded as ``data:`` URIs (PNG), no script, and nothing
  (font, style sheet, image) fetched from anywhere. At the top a summary: one row per *section* (a
  model on a task: the model, the task, where the examples came from, the methods, how many
  examples were shown and evaluated), then per section its faithfulness table (mean ± standard
  error per method and metric, the best value in bold, with the settings every number depends on:
  replacement, output type, steps, target) and its flipping curves. Then every example: its tokens
  as side-by-side heatmaps, one row per method on one shared colour scale
  (:func:`mamba_lrp.viz.html_comparison`, all text escaped), ground-truth tokens underlined.
* ``results.json``: the same numbers: per section the :func:`mamba_lrp.evaluate` summary, and per
  example the tokens, the explained target and position, and each method's relevance, explained
  output and conservation error (non-finite values as ``null``).

Both are written atomically (:func:`mamba_lrp.viz.write_text_atomic`: a temporary file, then a
rename). An existing report is not overwritten unless ``force=True``: :func:`check_report`
raises ``FileExistsError`` when ``report.html``, ``results.json`` or evaluation results (a
summary or a result row) under ``evaluation/`` are there, so a caller can refuse before doing any work.

:func:`report_section` builds a section: it runs :func:`mamba_lrp.evaluate` over the data (files
in ``out_dir/evaluation/<name>/``), then explains the first ``show`` examples with every method,
for the target that the evaluation used (the label's token, or the model's top prediction), so
the heatmaps show what the table measured.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mamba_lrp import viz
from mamba_lrp.evaluation import RESULTS, ExampleSource, evaluate, has_results, read_curves
from mamba_lrp.explain import explain
from mamba_lrp.explanation import Explanation
from mamba_lrp.faithfulness import FlipCurve
from mamba_lrp.progress import progress_bar

REPORT_HTML = "report.html"
RESULTS_JSON = "results.json"
EVALUATION_DIR = "evaluation"

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;max-width:1150px;"
    "margin:1.5em auto;padding:0 1em}"
    "h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"
    "h3{font-size:1.05em;margin:.3em 0}"
    "table{border-collapse:collapse;margin:.6em 0;font-size:14px}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.best{font-weight:bold}"
    ".meta{color:#555;font-size:13px;margin:.2em 0 .6em}"
    ".example{border:1px solid #e3e3e3;border-radius:6px;padding:.5em 1em;margin:1em 0}"
    "img.figure{max-width:100%;height:auto;border:1px solid #eee}"
)


@dataclass
class ReportExample:
    """One explained input: ``explanations`` maps each method to an unbatched :class:`Explanation`
    of the same input and target; ``label`` the known answer (if any); ``target_token`` the explained
    token as text; ``evidence`` the ground-truth positions (underlined)."""

    explanations: dict[str, Explanation]
    title: str = ""
    label: str | None = None
    target_token: str | None = None
    evidence: tuple[int, ...] = ()


@dataclass
class ReportSection:
    """A model on a task: its explained ``examples``, the :func:`mamba_lrp.evaluate` ``summary``
    and the flipping ``curves`` per method (:func:`mamba_lrp.evaluation.read_curves`); ``data``
    says where the examples came from; ``details`` adds rows to the summary (e.g. test accuracy)."""

    model: str
    methods: list[str]
    examples: list[ReportExample] = field(default_factory=list)
    task: str | None = None
    data: str | None = None
    summary: dict | None = None
    curves: Mapping[str, Sequence[FlipCurve]] | None = None
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- files
def slug(name: str) -> str:
    """A file-name-safe form of ``name`` (its last path component; other characters as ``-``)."""
    last = Path(str(name).rstrip("/\\")).name or str(name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model"


def evaluation_dir(out_dir: str | Path, name: str) -> Path:
    """Where :func:`report_section` puts the evaluation files of section ``name``."""
    return Path(out_dir) / EVALUATION_DIR / slug(name)


def check_report(out_dir: str | Path, force: bool = False) -> None:
    """Raise ``FileExistsError`` when ``out_dir`` already holds a report (``report.html``,
    ``results.json`` or evaluation results under ``evaluation/``) and not ``force``; ``ValueError`` when
    ``out_dir`` is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if force:
        return
    for path in (out / REPORT_HTML, out / RESULTS_JSON):
        if path.exists():
            raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite the report")
    evaluation = out / EVALUATION_DIR
    if evaluation.is_dir() and any(has_results(path) for path in [evaluation, *evaluation.iterdir()]):
        raise FileExistsError(f"{evaluation} holds an earlier evaluation; pass --force (force=True) to replace it")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mamba-lrp")
    except Exception:  # not installed (a source checkout on sys.path)
        return "unknown"


# --------------------------------------------------------------------------- building
def explain_example(model: Any, input_ids: Sequence[int], methods: Sequence[str], *, tokenizer: Any = None,
                    target: int | None = None, position: int = -1, title: str = "", label: str | None = None,
                    evidence: Sequence[int] = (), **options: Any) -> ReportExample:
    """Explain one input with every method, all for the same target (``None``: the first method's,
    i.e. the model's top prediction)."""
    explanations: dict[str, Explanation] = {}
    ids = torch.as_tensor(list(input_ids))
    for method in methods:
        explanation = explain(model, ids, target=target, position=position, method=method, tokenizer=tokenizer,
                              **options)
        explanations[method] = explanation
        target = int(explanation.target)
    token = None
    if tokenizer is not None and target is not None:
        token = str(tokenizer.convert_ids_to_tokens(int(target)))
    return ReportExample(explanations=explanations, title=title, label=label, target_token=token,
                         evidence=tuple(int(position) for position in evidence))


def report_section(model: Any, tokenizer: Any, data: Any, methods: Sequence[str], metrics: Sequence[str], *,
                   out_dir: str | Path, name: str, task: str | None = None, data_name: str | None = None,
                   show: int = 5, limit: int | None = None, text_column: str = "text",
                   label_column: str | None = None, label_to_token: Mapping | None = None, position: int = -1,
                   steps: int | Sequence[float] = 20, replacement: int | str = "zero_embedding",
                   output: str = "logit", progress: bool = True, details: dict[str, Any] | None = None,
                   **options: Any) -> ReportSection:
    """Evaluate ``methods`` on ``data`` (a ``datasets.Dataset``, e.g. from
    :func:`mamba_lrp.data.load_data`; see :func:`mamba_lrp.evaluate`) with ``metrics`` into
    :func:`evaluation_dir` ``(out_dir, name)``, and explain its first ``show`` examples.

    The explained token is the label's (``label_column`` given; ``label_to_token`` maps labels to
    tokens) or the model's top prediction. A data set with an ``evidence`` column (the built-in
    tasks) gets its ground-truth tokens underlined, when the tokenizer gives the ids the data
    holds in ``input_ids``."""
    if not isinstance(show, int) or show < 0:
        raise ValueError(f"`show` must be a non-negative integer, got {show!r}")
    methods = list(methods)
    directory = evaluation_dir(out_dir, name)
    summary = evaluate(model, data, methods, metrics, tokenizer, out=directory, text_column=text_column,
                       label_column=label_column, label_to_token=label_to_token,
                       target="label" if label_column else "prediction", limit=limit, position=position,
                       steps=steps, replacement=replacement, output=output, progress=progress, **options)
    targets: dict[int, int] = {}
    for line in (directory / RESULTS).read_text().splitlines():
        row = json.loads(line)
        targets.setdefault(int(row["index"]), int(row["target"]))
    source = ExampleSource(data, tokenizer, text_column, "input_ids", label_column)
    columns = list(getattr(data, "column_names", []))
    shown = [index for index in range(min(show, len(source))) if index in targets]
    examples = []
    with progress_bar(len(shown), f"explain {name}", enabled=progress) as bar:
        for index in shown:
            ids, label = source[index]
            evidence: list[int] = []
            if "evidence" in columns and ("input_ids" not in columns or list(data[index]["input_ids"]) == ids):
                evidence = list(data[index]["evidence"])
            examples.append(explain_example(model, ids, methods, tokenizer=tokenizer, target=targets[index],
                                            position=position, title=f"example {index}",
                                            label=None if label is None else str(label), evidence=evidence,
                                            **options))
            bar.advance()
    return ReportSection(model=name, methods=methods, examples=examples, task=task, data=data_name, summary=summary,
                         curves=read_curves(directory), details=dict(details or {}))


# --------------------------------------------------------------------------- HTML
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _faithfulness_table(summary: dict) -> str:
    metrics = list(summary["metrics"])
    results = summary["results"]
    best: dict[str, float | None] = {}
    for metric in metrics:
        means = [entry[metric]["mean"] for entry in results.values() if entry[metric]["mean"] is not None]
        higher = summary["metrics"][metric]["higher_is_better"]
        best[metric] = (max(means) if higher else min(means)) if means else None
    head = "".join(f'<th title="{_esc(summary["metrics"][metric]["definition"])}">{_esc(metric)} '
                   f'{"↑" if summary["metrics"][metric]["higher_is_better"] else "↓"}</th>' for metric in metrics)
    rows = []
    for method, entry in results.items():
        cells = []
        for metric in metrics:
            mean, error = entry[metric]["mean"], entry[metric]["stderr"]
            text = _number(mean) + ("" if error is None else f" ± {error:.2g}")
            kind = "num best" if mean is not None and mean == best[metric] else "num"
            cells.append(f'<td class="{kind}">{_esc(text)}</td>')
        count = max((item["n"] for item in entry.values()), default=0)
        rows.append(f"<tr><td>{_esc(method)}</td>{''.join(cells)}<td class=num>{count}</td></tr>")
    settings = summary.get("settings", {})
    note = (f"{summary.get('n_examples', '?')} examples; mean ± standard error; ↑ higher is better, ↓ lower is "
            f"better; best in bold. Replacement {settings.get('replacement')!r}, output {settings.get('output')!r} "
            f"(ERASER metrics: probabilities), steps {settings.get('steps')!r}, target {settings.get('target')!r}, "
            f"position {settings.get('position')!r}.")
    return (f"<table class=faithfulness><tr><th>method</th>{head}<th>n</th></tr>{''.join(rows)}</table>"
            f"<p class=meta>{_esc(note)}</p>")


def _figure_img(figure: Any, alt: str) -> str:
    data = base64.b64encode(viz.figure_png(figure)).decode("ascii")
    return f'<img class=figure alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _overview(sections: Sequence[ReportSection]) -> str:
    detail_keys = sorted({key for section in sections for key in section.details})
    head = "".join(f"<th>{_esc(key)}</th>" for key in detail_keys)
    rows = []
    for number, section in enumerate(sections, 1):
        evaluated = section.summary.get("n_examples") if section.summary else None
        details = "".join(f"<td>{_esc(section.details.get(key, ''))}</td>" for key in detail_keys)
        rows.append(f'<tr><td><a href="#section-{number}">{_esc(section.model)}</a></td>'
                    f"<td>{_esc(section.task or '–')}</td><td>{_esc(section.data or '–')}</td>"
                    f"<td>{_esc(', '.join(section.methods))}</td><td class=num>{len(section.examples)}</td>"
                    f"<td class=num>{_esc(evaluated if evaluated is not None else '–')}</td>{details}</tr>")
    return ("<table class=overview><tr><th>model</th><th>task</th><th>data</th><th>methods</th>"
            f"<th>examples shown</th><th>examples evaluated</th>{head}</tr>{''.join(rows)}</table>")


def _example_html(example: ReportExample, anchor: str) -> str:
    first = next(iter(example.explanations.values()))
    facts = []
    if example.label is not None:
        facts.append(f"label {example.label!r}")
    target = f"{example.target_token!r} (id {int(first.target)})" if example.target_token else str(int(first.target))
    facts.append(f"explained: the logit of {target} at position {int(first.position)}, "
                 f"value {float(first.output):.4g}")
    if example.evidence:
        facts.append("underlined: ground-truth tokens")
    facts.append("one colour scale shared by all rows")
    body = viz.html_comparison(example.explanations, normalize="shared", evidence=example.evidence)
    return (f'<div class="example" id="{_esc(anchor)}"><h3>{_esc(example.title)}</h3>'
            f"<p class=meta>{_esc(' · '.join(facts))}</p>{body}</div>")


def render_report(sections: Sequence[ReportSection], title: str = "mamba-lrp report",
                  details: Mapping[str, Any] | None = None) -> str:
    """The report page (see the module docstring) as one HTML string."""
    methods = sorted({method for section in sections for method in section.methods})
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [f"generated {generated} by mamba-lrp {_version()}"]
    lines += [f"{key}: {value}" for key, value in (details or {}).items()]
    parts = [f"<h1>{_esc(title)}</h1>", f"<p class=meta>{_esc(' · '.join(lines))}</p>",
             "<h2>Summary</h2>", f"<p>Methods: {_esc(', '.join(methods))}.</p>", _overview(sections)]
    for number, section in enumerate(sections, 1):
        parts.append(f'<h2 id="section-{number}">Faithfulness: {_esc(section.model)}'
                     f"{' on ' + _esc(section.task) if section.task else ''}</h2>")
        if section.summary is not None:
            parts.append(_faithfulness_table(section.summary))
        else:
            parts.append("<p class=meta>not evaluated</p>")
        curves = {method: list(items) for method, items in (section.curves or {}).items() if items}
        if curves:
            parts.append(_figure_img(viz.plot_flip_curves(curves), f"flipping curves of {section.model}"))
    for number, section in enumerate(sections, 1):
        parts.append(f"<h2>Examples: {_esc(section.model)}</h2>")
        if not section.examples:
            parts.append("<p class=meta>no examples shown</p>")
        for index, example in enumerate(section.examples, 1):
            parts.append(_example_html(example, f"example-{number}-{index}"))
    return viz.html_document("\n".join(parts), title=title, style=_STYLE)


def report_results(sections: Sequence[ReportSection], title: str = "mamba-lrp report",
                   details: Mapping[str, Any] | None = None) -> dict:
    """The numbers of the report as a JSON-ready dict (see the module docstring)."""
    def example_record(example: ReportExample) -> dict:
        first = next(iter(example.explanations.values()))
        return {
            "title": example.title, "label": example.label, "tokens": first.tokens,
            "input_ids": first.input_ids.tolist(), "target": int(first.target), "target_token": example.target_token,
            "position": int(first.position), "evidence": list(example.evidence),
            "methods": {method: {"relevance": explanation.relevance.tolist(), "output": float(explanation.output),
                                 "conservation_error": float(explanation.conservation_error)}
                        for method, explanation in example.explanations.items()},
        }
    return _finite({
        "title": title, "mamba_lrp_version": _version(), "details": dict(details or {}),
        "sections": [{"model": section.model, "task": section.task, "data": section.data, "methods": section.methods,
                      "details": section.details, "faithfulness": section.summary,
                      "examples": [example_record(example) for example in section.examples]}
                     for section in sections],
    })


def write_report(out_dir: str | Path, sections: ReportSection | Sequence[ReportSection], *,
                 title: str = "mamba-lrp report", details: Mapping[str, Any] | None = None,
                 force: bool = False) -> Path:
    """Write ``report.html`` and ``results.json`` to ``out_dir`` (atomically; an existing report
    only with ``force``); returns the path of ``report.html``."""
    if isinstance(sections, ReportSection):
        sections = [sections]
    if not sections:
        raise ValueError("a report needs at least one section")
    out = Path(out_dir)
    for path in (out / REPORT_HTML, out / RESULTS_JSON):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite the report")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    page = render_report(sections, title, details)
    numbers = json.dumps(report_results(sections, title, details), indent=1, allow_nan=False) + "\n"
    viz.write_text_atomic(out / RESULTS_JSON, numbers, force=True)
    return viz.write_text_atomic(out / REPORT_HTML, page, force=True)


__all__ = [
    "EVALUATION_DIR", "REPORT_HTML", "RESULTS_JSON", "ReportExample", "ReportSection", "check_report",
    "evaluation_dir", "explain_example", "render_report", "report_results", "report_section", "slug",
    "write_report",
]
