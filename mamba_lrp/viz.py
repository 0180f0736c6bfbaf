"""Showing explanations: HTML heatmaps, terminal heatmaps and matplotlib figures.

* HTML (:func:`html_heatmap`, :func:`html_comparison`, :func:`html_document`): tokens as inline
  spans coloured by a diverging map centred at zero (red positive, blue negative) on a symmetric
  scale ``max |R|``; each token's value is its tooltip (``title``). All token text and attribute
  values are HTML-escaped. Colours are quantised into ``2 * LEVELS + 1`` classes whose CSS is
  written once per fragment, so a token costs about 30 bytes plus its text and 10,000 tokens render
  in milliseconds. A relevance-vs-position strip (inline SVG polyline) sits above each row for
  orientation in long inputs. Ground-truth tokens (``evidence=``) are underlined. Fragments are
  self-contained (inline CSS, no external fetches).
* Terminal (:func:`terminal_heatmap`, :func:`print_heatmap`): ``rich`` background colours when
  ``rich`` is importable and the output is a terminal, else plain text with values.
* matplotlib (:func:`plot_heatmap`, :func:`plot_flip_curves`, :func:`plot_conservation`,
  :func:`plot_distance`, :func:`plot_layer_sums`; :func:`save` by suffix, :func:`figure_png` as
  bytes): figures are built with ``matplotlib.figure.Figure`` (Agg canvas), never through
  ``pyplot``, so no global state or GUI backend is touched.

Subword markers are cleaned for display: ``Ġ`` and ``▁`` become a space, ``Ċ`` a newline. Tokens
of a vocabulary without such markers (no token starts with whitespace: a word-level tokenizer) are
separated by a space in HTML.
"""

from __future__ import annotations

import html
import io
import os
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mamba_lrp.explanation import Explanation
    from mamba_lrp.faithfulness import FlipCurve

#: Colour levels on each side of zero in the HTML heatmap.
LEVELS = 10
_NEGATIVE = (33, 102, 172)   # RdBu's blue end
_POSITIVE = (178, 24, 43)    # RdBu's red end
_WHITE = (255, 255, 255)
_SUFFIXES = (".png", ".svg", ".pdf")


# ---------------------------------------------------------------- helpers
def clean_token(token: str) -> str:
    """``token`` for display: ``Ġ``/``▁`` -> space, ``Ċ`` -> newline."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")


def relevance_color(value: float, scale: float) -> str:
    """The hex colour of ``value`` on the diverging map with symmetric ``scale`` (white at zero)."""
    fraction = 0.0 if scale <= 0 else max(-1.0, min(1.0, value / scale))
    end = _POSITIVE if fraction >= 0 else _NEGATIVE
    weight = abs(fraction)
    rgb = (round(white + (colour - white) * weight) for white, colour in zip(_WHITE, end, strict=True))
    return "#" + "".join(f"{channel:02x}" for channel in rgb)


def _level(value: float, scale: float) -> int:
    """Quantised colour level in ``[-LEVELS, LEVELS]``."""
    if scale <= 0:
        return 0
    return max(-LEVELS, min(LEVELS, round(value / scale * LEVELS)))


def _level_class(level: int) -> str:
    return f"p{level}" if level >= 0 else f"n{-level}"


def _rows(explanation: Explanation) -> list[tuple[list[str], list[float]]]:
    """``[(display tokens, relevance)]`` per sequence, padding dropped."""
    if explanation.is_batched:
        return [row for index in range(len(explanation)) for row in _rows(explanation[index])]
    relevance = explanation.relevance.detach().float().cpu().tolist()
    if explanation.tokens is not None:
        tokens = [clean_token(str(token)) for token in explanation.tokens]
    else:
        tokens = [f"[{int(token_id)}]" for token_id in explanation.input_ids.tolist()]
    if explanation.attention_mask is not None:
        keep = explanation.attention_mask.tolist()
        tokens = [token for token, kept in zip(tokens, keep, strict=True) if kept]
        relevance = [value for value, kept in zip(relevance, keep, strict=True) if kept]
    return [(tokens, relevance)]


def _scale(values: Sequence[float]) -> float:
    return max((abs(value) for value in values), default=0.0)


def _as_named(explanations: Mapping[str, Explanation] | Sequence[Explanation] | Explanation) -> dict[str, Any]:
    if isinstance(explanations, Mapping):
        return dict(explanations)
    if hasattr(explanations, "relevance"):
        return {explanations.method: explanations}
    named: dict[str, Any] = {}
    for explanation in explanations:
        name, suffix = explanation.method, 2
        while name in named:
            name, suffix = f"{explanation.method} ({suffix})", suffix + 1
        named[name] = explanation
    return named


# ------------------------------------------------------------------- HTML
_CSS = (".mlrp{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.7}"
        ".mlrp .row{white-space:pre-wrap;word-break:break-word;margin:2px 0 10px}"
        ".mlrp .row span{border-radius:2px}"
        ".mlrp .row span.gt{text-decoration:underline 2px;text-underline-offset:3px}"
        ".mlrp .lab{font-weight:bold;font-family:sans-serif;font-size:12px;color:#333}"
        ".mlrp svg{display:block;width:100%;height:28px;background:#fafafa}")


def _css() -> str:
    rules = [_CSS]
    for level in range(-LEVELS, LEVELS + 1):
        if level:
            colour = relevance_color(level / LEVELS, 1.0)
            text = "color:#fff;" if abs(level) > 0.6 * LEVELS else ""
            rules.append(f".mlrp .{_level_class(level)}{{background:{colour};{text}}}")
    return "<style>" + "".join(rules) + "</style>"


def _strip_svg(relevance: Sequence[float], scale: float, points: int = 400) -> str:
    """A relevance-vs-position polyline (binned to at most ``points`` points, keeping each bin's
    value of largest magnitude) with a zero line."""
    length = len(relevance)
    if length == 0:
        return ""
    bins = min(points, length)
    coordinates = []
    for index in range(bins):
        chunk = relevance[index * length // bins:max((index + 1) * length // bins, index * length // bins + 1)]
        value = max(chunk, key=abs)
        x = 1000 * (index + 0.5) / bins
        y = 14 - (0 if scale <= 0 else 12 * value / scale)
        coordinates.append(f"{x:.0f},{y:.1f}")
    return ('<svg viewBox="0 0 1000 28" preserveAspectRatio="none" role="img" aria-label="relevance by position">'
            '<line x1="0" y1="14" x2="1000" y2="14" stroke="#bbb" stroke-width="1"/>'
            f'<polyline fill="none" stroke="#444" stroke-width="1.5" vector-effect="non-scaling-stroke" '
            f'points="{" ".join(coordinates)}"/></svg>')


def _html_row(tokens: Sequence[str], relevance: Sequence[float], scale: float,
              evidence: Collection[int] = ()) -> str:
    parts = []
    for index, (token, value) in enumerate(zip(tokens, relevance, strict=True)):
        text = html.escape(token, quote=False)
        tip = html.escape(f"{value:.3g}", quote=True)
        level = _level(value, scale)
        classes = ([_level_class(level)] if level else []) + (["gt"] if index in evidence else [])
        if len(classes) > 1:
            parts.append(f'<span class="{" ".join(classes)}" title="{tip} (ground truth)">{text}</span>')
        elif classes == ["gt"]:
            parts.append(f'<span class=gt title="{tip} (ground truth)">{text}</span>')
        elif classes:
            parts.append(f'<span class={classes[0]} title="{tip}">{text}</span>')
        else:
            parts.append(f'<span title="{tip}">{text}</span>')
    # word-level vocabularies carry no space markers: separate their tokens by a space
    separator = "" if any(token[:1].isspace() for token in tokens) else " "
    return '<div class="row">' + separator.join(parts) + "</div>"


def _label(name: str, explanation: Explanation | None, scale: float) -> str:
    details = ""
    if explanation is not None and not explanation.is_batched:
        details = (f" &middot; target {int(explanation.target)} at position {int(explanation.position)}"
                   f" &middot; output {float(explanation.output):.4g}")
    return (f'<div class="lab">{html.escape(name)}{details}'
            f" &middot; scale &plusmn;{html.escape(f'{scale:.3g}')}</div>")


def html_comparison(
    explanations: Mapping[str, Explanation] | Sequence[Explanation] | Explanation,
    normalize: str = "shared",
    strip: bool = True,
    evidence: Collection[int] = (),
) -> str:
    """Several explanations (methods) of the same input, one row each, as one HTML fragment.

    ``normalize="shared"`` colours every row on one scale (the largest ``|R|`` of all rows), so
    colours compare across rows; ``"row"`` scales each row by its own ``max |R|``. A batched
    explanation gives one row per sequence. ``strip`` adds the relevance-vs-position strip.
    ``evidence``: positions of ground-truth tokens (indices into the shown tokens, padding
    dropped), underlined in every row."""
    if normalize not in ("shared", "row"):
        raise ValueError(f"normalize must be 'shared' or 'row', got {normalize!r}")
    named = _as_named(explanations)
    rows = []
    for name, explanation in named.items():
        sequences = _rows(explanation)
        for index, (tokens, relevance) in enumerate(sequences):
            label = name if len(sequences) == 1 else f"{name} [{index}]"
            rows.append((label, explanation if len(sequences) == 1 else None, tokens, relevance))
    shared = max((_scale(relevance) for *_, relevance in rows), default=0.0)
    parts = ['<div class="mlrp">', _css()]
    for label, explanation, tokens, relevance in rows:
        scale = shared if normalize == "shared" else _scale(relevance)
        parts.append(_label(label, explanation, scale))
        if strip:
            parts.append(_strip_svg(relevance, scale))
        parts.append(_html_row(tokens, relevance, scale, set(evidence)))
    parts.append("</div>")
    return "".join(parts)


def html_heatmap(explanation: Explanation, strip: bool = True) -> str:
    """One explanation as an HTML fragment with inline CSS (each sequence of a batch on its own
    scale; :func:`html_comparison` chooses)."""
    return html_comparison({explanation.method: explanation}, normalize="row", strip=strip)


def html_document(body: str, title: str = "mamba-lrp explanation", style: str = "") -> str:
    """A complete, self-contained HTML page around ``body`` (a fragment from this module), with
    ``style`` (CSS rules) in its head."""
    head_style = f"<style>{style}</style>" if style else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title>{head_style}</head><body>\n{body}\n</body></html>\n")


def write_text_atomic(path: str | Path, text: str, force: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename; an existing file is an
    error (``FileExistsError``) unless ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force (force=True) to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


# --------------------------------------------------------------- terminal
def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _header(name: str, explanation: Explanation, scale: float) -> str:
    if explanation.is_batched:
        return f"{name}: {len(explanation)} sequences, scale ±{scale:.3g}"
    return (f"{name}: target {int(explanation.target)} at position {int(explanation.position)}, "
            f"output {float(explanation.output):.4g}, sum R {float(explanation.relevance.sum()):.4g}, "
            f"scale ±{scale:.3g}")


def terminal_heatmap(explanation: Explanation, color: bool | None = None, width: int = 100,
                     scale: float | None = None, name: str | None = None) -> str:
    """The heatmap as text. ``color=True``: ANSI background colours via ``rich`` (falls back to
    plain when rich is missing); ``False``: plain ``token(+value)`` text; None: colour when rich is
    importable and stdout is a terminal."""
    if color is None:
        color = sys.stdout.isatty()
    color = bool(color) and _rich_available()
    rows = _rows(explanation)
    scale = max(_scale(relevance) for _, relevance in rows) if scale is None else scale
    lines = [_header(name or explanation.method, explanation, scale)]
    if not color:
        for tokens, relevance in rows:
            lines.append(" ".join(f"{token.strip() or repr(token)}({value:+.3g})"
                                  for token, value in zip(tokens, relevance, strict=True)))
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.text import Text

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=width, highlight=False)
    console.print(lines[0], markup=False)
    for tokens, relevance in rows:
        text = Text()
        for token, value in zip(tokens, relevance, strict=True):
            foreground = "white" if scale > 0 and abs(value) > 0.6 * scale else "black"
            text.append(token, style=f"{foreground} on {relevance_color(value, scale)}")
        console.print(text)
    return buffer.getvalue()


def print_heatmap(explanation: Explanation, file: Any = None, color: bool | None = None, **options: Any) -> None:
    """Print :func:`terminal_heatmap` to ``file`` (stdout); colour only on a terminal by default."""
    file = sys.stdout if file is None else file
    if color is None:
        color = hasattr(file, "isatty") and file.isatty()
    file.write(terminal_heatmap(explanation, color=color, **options))


def show(explanation: Explanation) -> None:
    """Display in a notebook (IPython) as HTML, else print the terminal heatmap."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None and hasattr(get_ipython(), "kernel"):
        display(HTML(html_heatmap(explanation)))
    else:
        print_heatmap(explanation)


# ------------------------------------------------------------- matplotlib
def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``figure`` by the suffix of ``path`` (``.png``, ``.svg`` or ``.pdf``)."""
    target = Path(path)
    if target.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{target}: unsupported figure format; use one of {', '.join(_SUFFIXES)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format=target.suffix.lower()[1:], dpi=dpi)
    return target


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """``figure`` as PNG bytes (for data URIs in reports, or ``IPython.display.Image``)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_heatmap(explanations: Mapping[str, Explanation] | Sequence[Explanation] | Explanation,
                 normalize: str = "shared", max_labels: int = 80) -> Figure:
    """A row of coloured cells per method (or sequence), ``RdBu_r`` on a symmetric scale; tokens
    as x labels when there are at most ``max_labels``."""
    if normalize not in ("shared", "row"):
        raise ValueError(f"normalize must be 'shared' or 'row', got {normalize!r}")
    rows = [(name if len(seqs) == 1 else f"{name} [{index}]", tokens, relevance)
            for name, explanation in _as_named(explanations).items()
            for seqs in [_rows(explanation)] for index, (tokens, relevance) in enumerate(seqs)]
    length = max(len(tokens) for _, tokens, _ in rows)
    figure = _figure(min(2 + 0.35 * length, 24), 1.0 + 0.6 * len(rows) + (1.2 if length <= max_labels else 0))
    axes = figure.add_subplot()
    shared = max(_scale(relevance) for *_, relevance in rows) or 1.0
    matrix = torch.full((len(rows), length), float("nan"))
    for index, (_, _, relevance) in enumerate(rows):
        scale = shared if normalize == "shared" else (_scale(relevance) or 1.0)
        matrix[index, :len(relevance)] = torch.tensor(relevance) / scale
    image = axes.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    if length <= max_labels:
        axes.set_xticks(range(length), [repr(token.strip()) if not token.strip() else token.strip()
                                        for token in rows[0][1]] + [""] * (length - len(rows[0][1])),
                        rotation=90, fontsize=8)
    else:
        axes.set_xlabel("position")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("R / max|R|" + (f" (shared scale ±{shared:.3g})" if normalize == "shared" else " (per row)"))
    return figure


def plot_flip_curves(curves: Mapping[str, FlipCurve | Sequence[FlipCurve]]) -> Figure:
    """Flipping curves per method: ``f`` against the fraction of flipped tokens, averaged over the
    examples of each (method, order, mode); solid MoRF, dashed LeRF, dotted random. The legend
    gives the area under each curve."""
    figure = _figure(6.5, 4.2)
    axes = figure.add_subplot()
    styles = {"morf": "-", "lerf": "--", "random": ":"}
    colours = {}
    for name, value in curves.items():
        group = [value] if hasattr(value, "values") else list(value)
        by_kind: dict[tuple[str, str], list[FlipCurve]] = {}
        for curve in group:
            by_kind.setdefault((curve.order, curve.mode), []).append(curve)
        for (order, mode), members in by_kind.items():
            sizes = {len(curve.values) for curve in members}
            if len(sizes) != 1:
                raise ValueError(f"{name}: {order}/{mode} curves have different numbers of steps {sorted(sizes)}")
            values = torch.stack([curve.values.double() for curve in members]).mean(0)
            fractions = members[0].fractions.double()
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            axes.plot(fractions.numpy(), values.numpy(), styles.get(order, "-."), color=colour,
                      label=f"{name} {order.upper()} {mode} (area {float(values.mean()):.3g})")
    axes.set_xlabel("fraction of tokens flipped")
    axes.set_ylabel("explained output f")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


def _explanation_list(value: Any) -> list[Explanation]:
    items = [value] if hasattr(value, "relevance") else list(value)
    return [item[index] if item.is_batched else item
            for item in items for index in (range(len(item)) if item.is_batched else [0])]


def plot_conservation(explanations: Mapping[str, Explanation | Sequence[Explanation]]) -> Figure:
    """Sum of relevance against the explained output, one colour per method, with the line
    ``sum R = f`` (perfect conservation)."""
    figure = _figure(5.0, 4.5)
    axes = figure.add_subplot()
    extent = []
    for name, value in _as_named(explanations).items():
        items = _explanation_list(value)
        outputs = [float(item.output) for item in items]
        sums = [float(item.relevance.sum()) for item in items]
        axes.scatter(outputs, sums, s=14, alpha=0.7, label=name)
        extent += outputs + sums
    low, high = (min(extent), max(extent)) if extent else (0.0, 1.0)
    axes.plot([low, high], [low, high], color="#888", linewidth=1, label="sum R = f")
    axes.set_xlabel("explained output f")
    axes.set_ylabel("sum of relevance")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


def plot_distance(explanations: Mapping[str, Explanation | Sequence[Explanation]], absolute: bool = True) -> Figure:
    """Mean relevance (``|R|`` / ``R_total`` share when ``absolute``) against the distance
    ``position - t`` from the explained position, per method, averaged over explanations."""
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    for name, value in _as_named(explanations).items():
        totals: dict[int, list[float]] = {}
        for item in _explanation_list(value):
            relevance = item.relevance.detach().double().cpu()
            if item.attention_mask is not None:
                relevance = relevance * item.attention_mask.double().cpu()
            if absolute:
                relevance = relevance.abs() / max(float(relevance.abs().sum()), 1e-12)
            position = int(item.position)
            for index in range(position + 1):
                totals.setdefault(position - index, []).append(float(relevance[index]))
        distances = sorted(totals)
        axes.plot(distances, [sum(totals[d]) / len(totals[d]) for d in distances], marker=".", label=name)
    axes.set_xlabel("distance from the explained position (tokens)")
    axes.set_ylabel("share of |R|" if absolute else "mean R")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


def plot_layer_sums(explanations: Mapping[str, Explanation | Sequence[Explanation]]) -> Figure:
    """Relevance summed at the input of each block (and the final norm), per method, averaged
    over explanations, with the mean explained output as a dashed line. Methods without layers
    are skipped."""
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    outputs = []
    for name, value in _as_named(explanations).items():
        items = [item for item in _explanation_list(value) if item.layer_sums is not None]
        if not items:
            continue
        sums = torch.stack([item.layer_sums.double().cpu() for item in items]).mean(0)
        outputs += [float(item.output) for item in items]
        axes.plot(range(len(sums)), sums.numpy(), marker="o", label=name)
    if outputs:
        axes.axhline(sum(outputs) / len(outputs), color="#888", linestyle="--", label="mean output f")
    axes.set_xlabel("block input (last = final norm)")
    axes.set_ylabel("sum of relevance")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


__all__ = [
    "LEVELS", "clean_token", "figure_png", "html_comparison", "html_document", "html_heatmap", "plot_conservation",
    "plot_distance", "plot_flip_curves", "plot_heatmap", "plot_layer_sums", "print_heatmap", "relevance_color",
    "save", "show", "terminal_heatmap", "write_text_atomic",
]
