"""``pumer-plug show``: what a method kept of one example's image and question at every reduction layer.

For one example the model runs dense (its answer) and with the method attached and source tracing
on (:func:`~pumer_plug.ops.sources.trace_sources`). Every reduction layer gets a column: the input
image with pruned patches greyed out and each merged group of patches outlined and tinted in its
own colour, the layer's text-saliency heat map (PuMer Eq. 1, heads summed; "n/a" for methods
without one), and the surviving text tokens with merged words joined in brackets. The title holds
the question and the dense and reduced answers. Backbone-agnostic: the adapter says where the patch
grid and the text sit (``Adapter.token_layout``); the task says how tokens and answers read.

Example:
    >>> paths = run_show(get_task("builtin"), "pumer", load_config("pumer", "builtin-digits"), index=3)
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pumer_plug.errors import UserError
from pumer_plug.evaluation.tasks.base import Batch, Task, attach_method, check_methods_fit
from pumer_plug.ops.sources import PatchGroups, SourceTrace, patch_groups, token_groups, trace_sources

GREY = (0.55, 0.55, 0.55)
PALETTES = ("tab20", "tab20b", "tab20c")  # 60 distinct colours for merged groups before one repeats


@dataclass
class LayerView:
    """What one reduction layer left of the example (one row).

    Attributes:
        layer: the reduction layer.
        patches: kept, merged and pruned patches (:class:`~pumer_plug.ops.sources.PatchGroups`).
        text: surviving text tokens grouped by the token they went into (indices into the text).
        saliency: (rows, cols) text-saliency score of the token holding each patch (NaN: pruned
            before this layer), or None for methods without one.
        image_tokens: image tokens leaving the layer, image CLS included (equals
            ``handle.token_counts[layer].image`` for a one-example batch of a method that keeps modalities apart).
    """

    layer: int
    patches: PatchGroups
    text: list[list[int]]
    saliency: np.ndarray | None
    image_tokens: int


@dataclass
class ShowResult:
    """One example traced through a method; :func:`draw_example` draws it."""

    image: np.ndarray  # (H, W) or (H, W, 3) in [0, 1]
    grid: tuple[int, int]
    tokens: list[str]
    dense_answer: str
    reduced_answer: str
    target: str
    method: str
    config: str
    layers: list[LayerView]
    text_traced: bool = True  # False: the backbone reduces no text (decoders); the text row shows the prompt


def example(task: Task, split: str, index: int) -> Batch:
    """The ``index``-th example of ``split`` as a one-example batch.

    Raises:
        UserError: the split has fewer than ``index + 1`` examples.
    """
    count = 0
    for count, batch in enumerate(task.batches(split, 1, index + 1), start=1):
        if count == index + 1:
            return batch
    raise UserError(f"task {task.name!r} split {split!r} has {count} examples (--index 0..{count - 1}), "
                    f"no example {index}")


def _image_array(pixels: torch.Tensor) -> np.ndarray:
    """(C, H, W) model input -> (H, W) or (H, W, 3) in [0, 1] for display (min-max per image)."""
    x = pixels.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def _saliency_map(trace: SourceTrace, layer: int, previous: int | None, layout: Any, num_tokens: int) -> np.ndarray | None:
    """Scores of the layer's image segment (heads summed) spread over the patches that formed each token."""
    scores = trace.saliency.get(layer, {}).get(layout.image_stream)
    if scores is None:
        return None
    before, discard = trace.slots(-1 if previous is None else previous, layout.image_stream, num_tokens)
    row = before[0]
    first = int(row[layout.image_start - layout.image_prefix]) if layout.image_prefix else 0  # opens the image segment
    values = scores[0].float().sum(dim=0).cpu()  # PuMer Eq. (1): (H, V) -> (V,)
    rows, cols = layout.grid
    out = np.full(rows * cols, np.nan)
    for p, slot in enumerate(row[layout.image_start:layout.image_start + rows * cols].tolist()):
        if slot != discard and 0 <= slot - first < values.shape[0]:
            out[p] = float(values[slot - first])
    return out.reshape(rows, cols)


def trace_example(model: nn.Module, task: Task, method: str, config: Any, batch: Batch,
                  known_target: bool = True) -> ShowResult:
    """Runs one example dense and reduced (source tracing on) and collects every layer's view;
    ``known_target=False`` for a new example without a reference answer.

    Raises:
        UserError: the backbone has no image grid its adapter can place, or the method does not fit.
    """
    inputs, target = batch
    check_methods_fit(model, task.adapter, [(method, config)], task.image_tokens(inputs))
    dense = task.predictions(model, [(inputs, target)])
    with attach_method(model, task.adapter, method, config) as handle:
        trace = trace_sources(handle)
        reduced = task.predictions(model, [(inputs, target)])
        layout = handle.adapter.token_layout(trace.inputs)
        if layout is None:
            raise UserError(f"adapter {task.adapter!r} cannot place the image patches of this model's inputs")
    rows, cols = layout.grid
    num_tokens = layout.image_start + rows * cols + (layout.num_text if layout.text_stream != layout.image_stream else 0)
    ids = inputs["input_ids"][0].tolist() if inputs.get("input_ids") is not None else []
    views, previous = [], None
    for layer in sorted(trace.plans):
        slots, discard = trace.slots(layer, layout.image_stream, num_tokens)
        groups = patch_groups(slots[0], layout.image_start, rows * cols, discard)
        text: list[list[int]] = []
        if layout.text_stream:
            t_slots, t_discard = trace.slots(layer, layout.text_stream, num_tokens)
            text = token_groups(t_slots[0], layout.text_start, layout.num_text, t_discard)
        views.append(LayerView(layer, groups, text, _saliency_map(trace, layer, previous, layout, num_tokens),
                               groups.num_tokens + layout.image_prefix))
        previous = layer
    pixels = trace.inputs.get(layout.image_input)  # as the backbone saw it (SmRes: resized) ...
    pixels = inputs[layout.image_input] if pixels is None else pixels  # ... or as given (pool encodes it first)
    return ShowResult(image=_image_array(pixels.reshape(-1, *pixels.shape[-3:])[0]), grid=layout.grid,
                      tokens=task.token_texts(ids), dense_answer=task.answer_text(dense.outputs[0]),
                      reduced_answer=task.answer_text(reduced.outputs[0]),
                      target=task.answer_text(dense.targets[0]) if known_target else "?",
                      method=method, config=config.describe(), layers=views, text_traced=layout.text_stream is not None)


def _is_special(token: str) -> bool:
    """A special token, as tokenizers write them: ``[CLS]``, ``[PAD]`` (BERT) or ``<s>``, ``<image>`` (Llama)."""
    return len(token) > 2 and (token[0], token[-1]) in (("[", "]"), ("<", ">"))


def _text_line(tokens: list[str], groups: list[list[int]]) -> str:
    words = [tokens[g[0]] if len(g) == 1 else "[" + "+".join(tokens[i] for i in g) + "]" for g in groups]
    return textwrap.fill(" ".join(words), width=34)


def _draw_patches(ax: Any, result: ShowResult, view: LayerView | None) -> None:
    import matplotlib
    from matplotlib.patches import Rectangle

    image = result.image
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if view is None:
        return
    rows, cols = result.grid
    ch, cw = image.shape[0] / rows, image.shape[1] / cols

    def cell(p: int) -> tuple[float, float]:  # (x, y) of patch p's top-left corner in image pixels
        return p % cols * cw - 0.5, p // cols * ch - 0.5

    for p in view.patches.pruned:
        ax.add_patch(Rectangle(cell(p), cw, ch, facecolor=GREY, alpha=0.85, linewidth=0))
    colours = [c for name in PALETTES for c in matplotlib.colormaps[name].colors]
    for g, members in enumerate(view.patches.merged):
        colour = colours[g % len(colours)]
        for p in members:
            ax.add_patch(Rectangle(cell(p), cw, ch, facecolor=colour, alpha=0.35, edgecolor=colour, linewidth=1.6))


def draw_example(result: ShowResult, stem: str | Path) -> dict[str, Path]:
    """Draws ``result`` into ``stem.png`` and ``stem.svg``: one column per reduction layer."""
    import matplotlib
    from matplotlib.figure import Figure

    n = len(result.layers) + 1
    figure = Figure(figsize=(2.6 * n, 6.4), layout="constrained")
    axes = figure.subplots(3, n, squeeze=False, gridspec_kw={"height_ratios": [3, 3, 1.4]})
    question = " ".join(t for t in result.tokens if not _is_special(t))
    line = textwrap.fill(f"Q: {question}   answer: {result.target}   dense: {result.dense_answer}   "
                         f"reduced: {result.reduced_answer}", width=max(40, 30 * n))  # within the figure
    figure.suptitle(f"{result.method} ({result.config})\n{line}", fontsize=10)
    views: list[LayerView | None] = [None, *result.layers]
    for col, view in enumerate(views):
        ax_img, ax_sal, ax_txt = axes[0, col], axes[1, col], axes[2, col]
        _draw_patches(ax_img, result, view)
        if view is None:
            ax_img.set_title(f"input: {result.grid[0]}x{result.grid[1]} patches", fontsize=9)
        else:
            p = view.patches
            others = view.image_tokens - len(p.kept) - len(p.merged)  # tokens that are no patch (the image [CLS])
            ax_img.set_title(f"after layer {view.layer}: {view.image_tokens} image tokens\n"
                             f"{len(p.kept)} kept, {len(p.merged)} merged groups"
                             f"{f', {others} not a patch' if others > 0 else ''}, {len(p.pruned)} pruned", fontsize=8)
        ax_sal.set_xticks([])
        ax_sal.set_yticks([])
        if view is not None and view.saliency is not None:
            cmap = matplotlib.colormaps["magma"].with_extremes(bad=GREY)  # grey: pruned before this layer
            ax_sal.imshow(np.ma.masked_invalid(view.saliency), cmap=cmap, interpolation="nearest")
            ax_sal.set_title(f"text saliency at layer {view.layer} (grey: pruned before)", fontsize=8)
        else:
            ax_sal.text(0.5, 0.5, "text saliency: n/a" if view is not None else "", ha="center", va="center", fontsize=9)
            ax_sal.axis("off")
        ax_txt.axis("off")
        all_text = [[i] for i in range(len(result.tokens))]
        if result.text_traced:
            line = _text_line(result.tokens, view.text if view is not None else all_text)
        else:
            line = textwrap.fill(question, width=34) if view is None else "text: not reduced"
        ax_txt.text(0.0, 1.0, line, ha="left", va="top", fontsize=7, family="monospace", transform=ax_txt.transAxes)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"png": stem.with_suffix(".png"), "svg": stem.with_suffix(".svg")}
    figure.savefig(paths["png"], dpi=130)
    figure.savefig(paths["svg"])
    return paths


def run_show(task: Task, method: str, config: Any, split: str = "test", index: int = 0,
             output_dir: str | Path = "results/show", device: str = "cpu", image: str | Path | None = None,
             question: str | None = None) -> tuple[ShowResult, dict[str, Path]]:
    """Traces example ``index`` of ``split`` (or a new ``image`` file and ``question``) through ``method``
    and draws it into ``output_dir``.

    Raises:
        UserError: an image without a question (or the reverse), or a task that cannot encode new examples.
    """
    if (image is None) != (question is None):
        raise UserError("--image and --question go together")
    model = task.load_model(torch.device(device)).eval()
    if image is None:
        batch, stem = example(task, split, index), f"{method}-{split}-{index}"
    else:
        from PIL import Image

        with Image.open(image) as picture:
            batch, stem = (task.encode_example(picture, question), torch.zeros(1, dtype=torch.long)), f"{method}-{Path(image).stem}"
    result = trace_example(model, task, method, config, batch, known_target=image is None)
    return result, draw_example(result, Path(output_dir) / stem)
