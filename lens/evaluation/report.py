"""The evaluation's outputs: a table, report.md, results.json and PNG plots.

Methods are named short in tables and plots (a ``hf:`` path by its folder name; the full spec in a
footnote), and the written files name no absolute path of the measuring machine: paths inside the
dataset are written as the dataset argument was typed, other paths relative to the working directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from lens.evaluation.datasets import Dataset  # noqa: E402
from lens.evaluation.evaluate import RECALL_KS, MethodResult  # noqa: E402
from lens import methods  # noqa: E402
from lens.images import load_image  # noqa: E402
from lens.evaluation.metrics import interpolated_pr  # noqa: E402

COLUMNS = ["method", "mAP", *[f"R@{k}" for k in RECALL_KS], "query ms p50", "embed ms/img",
           "build s", "index KiB", "ANN recall@10"]


def short_name(spec: str) -> str:
    """A method's name for tables and plots: ``hf:<path or hub id>`` -> its last part (the folder or
    model name); ``kind:<path>`` -> ``kind:<folder name>``; a plain name stays."""
    tail = methods.short_name(spec)  # the menu's name: the argument's last part
    prefix = spec.partition(":")[0]
    return tail if tail == spec or prefix == "hf" else f"{prefix}:{tail}"


def short_names(specs: Sequence[str]) -> dict[str, str]:
    """{spec: short name}; a short name two specs would share keeps their full specs instead."""
    names = {spec: short_name(spec) for spec in specs}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {spec: name if counts[name] == 1 else spec for spec, name in names.items()}


def name_notes(specs: Sequence[str]) -> str:
    """Footnotes giving the full spec of every method shown by a short name ("" when there is none)."""
    return "\n".join(f"- `{name}` = `{spec}`" for spec, name in short_names(specs).items() if name != spec)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def table_rows(results: Sequence[MethodResult]) -> list[list[str]]:
    """One row of text cells per method, in :data:`COLUMNS` order (mAP and R@k to 3 decimals, milliseconds and
    seconds to 1, index size in KiB, "–" for a missing figure); a failed method's row says so."""
    rows = []
    names = short_names([r.method for r in results])
    for r in results:
        if r.error:
            rows.append([names[r.method], "failed (see below)"] + [""] * (len(COLUMNS) - 2))
            continue
        rows.append([names[r.method], _fmt(r.map), *[_fmt(r.recall[k]) for k in RECALL_KS], _fmt(r.query_ms_p50, 1),
                     _fmt(r.embed_ms_per_image, 1), _fmt(r.build_seconds, 1), _fmt(r.index_bytes / 1024, 0),
                     _fmt(r.ann_recall_at_10)])
    return rows


def failures(results: Sequence[MethodResult]) -> str:
    """One ``- <method> failed: <why>`` line per failed method ("" when none failed)."""
    names = short_names([r.method for r in results])
    return "\n".join(f"- {names[r.method]} failed: {r.error}" for r in results if r.error)


def text_table(results: Sequence[MethodResult]) -> str:
    """The results as an aligned plain-text table (what ``lens eval`` prints), followed by the failures."""
    rows = [COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ([failures(results)] if failures(results) else []))


def markdown_table(results: Sequence[MethodResult]) -> str:
    """The results as a Markdown table (:data:`COLUMNS`), for report.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


_MARKERS = "osD^v<>ph*"


def plot_map_vs_latency(results: Sequence[MethodResult], path: Path) -> None:
    """Write a PNG (120 dpi) to ``path``: mAP against query latency p50 (ms, log scale), one marker per
    method, named in a legend beside the plot; failed methods and those without a mAP are left out."""
    shown = [r for r in results if not r.error and not math.isnan(r.map) and r.query_ms_p50 > 0]
    names = short_names([r.method for r in results])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, r in enumerate(shown):
        ax.scatter(r.query_ms_p50, r.map, s=60, marker=_MARKERS[n % len(_MARKERS)], label=names[r.method],
                   zorder=3)
    ax.set_xscale("log")
    if shown:
        low = min(r.query_ms_p50 for r in shown)
        high = max(r.query_ms_p50 for r in shown)
        ax.set_xlim(low / 2, high * 2)
        decades = math.log10(high * 2) - math.log10(low / 2)
        # 1-2-5 ticks over a few decades, powers of ten over more: tick labels never run into each other
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  title="method", title_fontsize=8)
    ax.set_xlabel("query latency, p50 (ms, log scale; one query at a time, embedding included)")
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Quality against speed")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_pr_curves(results: Sequence[MethodResult], path: Path) -> None:
    """Write a PNG (120 dpi) of each method's precision-recall curve to ``path``: precision interpolated at 21
    recall levels and averaged over queries (:func:`lens.evaluation.metrics.interpolated_pr`); failed
    methods are left out."""
    names = short_names([r.method for r in results])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if r.error:
            continue
        recall, precision = interpolated_pr([(x.relevant, x.n_relevant) for x in r.rankings])
        ax.plot(recall, precision, label=f"{names[r.method]} (mAP {_fmt(r.map)})")
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision (mean over queries)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title("Precision-recall")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _tile(path: Path, size: int, frame: str | None) -> Image.Image:
    try:
        image = load_image(path)
    except Exception:
        image = Image.new("RGB", (size, size), (200, 200, 200))
    image = ImageOps.pad(image, (size, size), color=(255, 255, 255))
    if frame:
        image = ImageOps.expand(ImageOps.fit(image, (size - 8, size - 8)), border=4, fill=frame)
    return image


def plot_samples(results: Sequence[MethodResult], dataset: Dataset, path: Path, queries: int = 4,
                 top: int = 5, size: int = 96, files: Mapping[str, Path] | None = None,
                 max_rows: int = 16) -> None:
    """A grid: for a few queries, each method's top results framed green (relevant) or red (not).

    The first column names the method (wrapped to fit), the second shows the query. Fewer queries are
    shown when there are many methods (at most ``max_rows`` rows, at least one query). ``files`` maps
    gallery ids to files where they are not below the dataset's gallery folder (distractors).
    """
    ok = [r for r in results if not r.error and r.rankings]
    if not ok:
        return
    files = files or {}
    names = short_names([r.method for r in results])
    queries = max(1, min(queries, max_rows // len(ok)))
    chosen = ok[0].rankings[:: max(1, len(ok[0].rankings) // queries)][:queries]
    rows = [(q.query, r) for q in chosen for r in ok]
    height = len(rows) * 1.4 + 0.4
    fig, axes = plt.subplots(len(rows), top + 2, figsize=((top + 2.5) * 1.3, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5] + [1] * (top + 1)})
    for row, (query, result) in enumerate(rows):
        ranking = next(x for x in result.rankings if x.query == query)
        axes[row][0].text(0.0, 0.5, textwrap.fill(names[result.method], 24, break_long_words=True),
                          ha="left", va="center", fontsize=7, transform=axes[row][0].transAxes)
        axes[row][1].imshow(_tile(Path(query), size, None))
        for col in range(top):
            ax = axes[row][col + 2]
            if col < len(ranking.ids):
                colour = "#2ca02c" if ranking.relevant[col] else "#d62728"
                image = ranking.ids[col]
                ax.imshow(_tile(files.get(image, dataset.gallery_root / image), size, colour))
                ax.set_title(ranking.labels[col], fontsize=6, pad=1)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    axes[0][0].set_title("method", fontsize=7, loc="left")
    axes[0][1].set_title("query", fontsize=7)
    fig.suptitle("Top results per method (scores above): green = relevant, red = not", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # room for the title above the first row
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: an absolute path in running text: a "/" that does not continue a word, a number or another path
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~@/\\-])/[\w.+-]+(?:/[\w.+-]+)*/?")


def portable(text: str, typed_dataset: str | None = None) -> str:
    """``text`` without absolute paths of this machine.

    The dataset's folder is written as ``typed_dataset`` (the argument as typed); any other absolute
    path that exists here, or lies in the working directory, becomes relative to the working directory (``~/...`` when it lies in the
    home folder far outside it). Text that is not an existing path is left as it is.
    """
    if typed_dataset:
        resolved = str(Path(typed_dataset).resolve())
        if resolved != "/":
            typed = typed_dataset.rstrip("/") or typed_dataset
            text = re.sub(r"(?<![\w.~@/\\-])" + re.escape(resolved) + r"(?=$|[/\s'\"`),;:\]])",
                          lambda _: typed, text)
    home = os.path.realpath(os.path.expanduser("~"))

    def relative(match: re.Match[str]) -> str:
        path = match.group(0)
        cwd = os.getcwd()
        if not os.path.exists(path) and not (path + "/").startswith(cwd.rstrip("/") + "/"):
            return path
        real = os.path.realpath(path)
        rel = os.path.relpath(real)
        if rel.startswith(os.path.join("..", "..", "..")) and home != "/" and (real + "/").startswith(home + "/"):
            rel = "~" + real[len(home):]
        return rel + ("/" if path.endswith("/") and not rel.endswith("/") else "")

    return _ABSOLUTE_PATH.sub(relative, text)


def gallery_note(dataset: Dataset, distractors: Mapping[str, int]) -> str:
    """How many images the evaluation indexed, and where they came from."""
    count = len(dataset.gallery) + sum(distractors.values())
    if not distractors:
        return f"Gallery indexed: exactly the dataset's {len(dataset.gallery)} gallery images."
    folders = ", ".join(f"{n} in `{folder}`" for folder, n in distractors.items())
    return (f"Gallery indexed: {count} images = the dataset's {len(dataset.gallery)} gallery images + "
            f"{sum(distractors.values())} distractors ({folders}), relevant to no query.")


def write_report(
    results: Sequence[MethodResult], dataset: Dataset, out: Path, config: dict[str, Any], env: dict[str, Any],
    command: str, *, gallery_files: Mapping[str, Path] | None = None, typed_dataset: str | None = None,
) -> Path:
    """Write report.md, results.json and the plots into ``out``; returns the report's path.

    ``config["distractors"]`` ({folder: images}) says how many distractors joined the gallery;
    ``gallery_files`` (id -> file) finds gallery images outside the dataset's folder for the samples;
    ``typed_dataset`` is the dataset argument as typed (written instead of its absolute path).
    """
    out.mkdir(parents=True, exist_ok=True)
    plot_map_vs_latency(results, out / "map_vs_latency.png")
    plot_pr_curves(results, out / "pr_curves.png")
    plot_samples(results, dataset, out / "samples.png", files=gallery_files)
    distractors = dict(config.get("distractors") or {})
    indexed = len(dataset.gallery) + sum(distractors.values())
    payload = {"dataset": dataset.describe(), "command": command, "config": config,
               "gallery": {"dataset_images": len(dataset.gallery), "distractors": sum(distractors.values()),
                           "indexed": indexed},
               **env, "methods": [r.summary() for r in results]}
    text = json.dumps(payload, indent=2, default=str) + "\n"
    (out / "results.json").write_text(portable(text, typed_dataset))
    depth = f"top {config['top']}" if config.get("top") else "the full ranking"
    names = short_names([r.method for r in results])
    seen = "\n".join(f"- **{names[r.method]}**: {r.data_seen or '–'}" for r in results)
    scores = "\n".join(f"  - {names[r.method]}: {r.score_kind}" for r in results if not r.error)
    notes = name_notes([r.method for r in results])
    notes = f"\nMethods named short above, in full:\n{notes}\n" if notes else ""
    hardware = env["hardware"]
    report = f"""# lens eval: {dataset.name}

Reproduce: `{command}`

Dataset: {dataset.describe()}.
{gallery_note(dataset, distractors)}
Machine: {hardware['cpu']}, {hardware['cores']} cores, torch threads {hardware['torch_threads']}, GPU {hardware['gpu'] or 'none'}; {env['date']}.

{markdown_table(results)}
{notes}
{failures(results)}

- **mAP**: non-interpolated average precision over {depth} of the {indexed} indexed images, averaged over
  the queries that have at least one relevant gallery image; tied scores count as the expected value over
  their orders. A query is never counted as its own result; distractors are never relevant. Where an
  approximate index returns fewer images than asked, the rest follow in exact-search order.
- **R@k**: fraction of queries with at least one relevant image in the top k.
- **query ms p50**: one query at a time through the public search path, 10 results (decode excluded;
  embedding, index search and any re-ranking included). **embed ms/img**: batched, while building the index.
- **index KiB**: the search index's own files; **ANN recall@10**: the index's top 10 against exact search
  over the stored vectors (1.0 = exact).
- What the scores are (shown above each result in the sample picture):
{scores}

What each method learnt from:
{seen}

![mAP against latency](map_vs_latency.png)

![precision-recall](pr_curves.png)

![sample queries](samples.png)
"""
    (out / "report.md").write_text(portable(report, typed_dataset))
    return out / "report.md"
