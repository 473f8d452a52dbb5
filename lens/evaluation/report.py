"""The evaluation's outputs: a table, report.md, results.json and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from lens.evaluation.datasets import Dataset  # noqa: E402
from lens.evaluation.evaluate import RECALL_KS, MethodResult  # noqa: E402
from lens.images import load_image  # noqa: E402
from lens.evaluation.metrics import interpolated_pr  # noqa: E402

COLUMNS = ["method", "mAP", *[f"R@{k}" for k in RECALL_KS], "query ms p50", "embed ms/img",
           "build s", "index KiB", "ANN recall@10"]


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def table_rows(results: Sequence[MethodResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.error:
            rows.append([r.method, "failed (see below)"] + [""] * (len(COLUMNS) - 2))
            continue
        rows.append([r.method, _fmt(r.map), *[_fmt(r.recall[k]) for k in RECALL_KS], _fmt(r.query_ms_p50, 1),
                     _fmt(r.embed_ms_per_image, 1), _fmt(r.build_seconds, 1), _fmt(r.index_bytes / 1024, 0),
                     _fmt(r.ann_recall_at_10)])
    return rows


def failures(results: Sequence[MethodResult]) -> str:
    return "\n".join(f"- {r.method} failed: {r.error}" for r in results if r.error)


def text_table(results: Sequence[MethodResult]) -> str:
    rows = [COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ([failures(results)] if failures(results) else []))


def markdown_table(results: Sequence[MethodResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def plot_map_vs_latency(results: Sequence[MethodResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.error or math.isnan(r.map):
            continue
        ax.scatter(r.query_ms_p50, r.map, s=60)
        ax.annotate(r.method, (r.query_ms_p50, r.map), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("query latency, p50 (ms, log scale; one query at a time, embedding included)")
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Quality against speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pr_curves(results: Sequence[MethodResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.error:
            continue
        recall, precision = interpolated_pr([(x.relevant, x.n_relevant) for x in r.rankings])
        ax.plot(recall, precision, label=f"{r.method} (mAP {_fmt(r.map)})")
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision (mean over queries)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Precision-recall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
                 top: int = 5, size: int = 96) -> None:
    """A grid: for a few queries, each method's top results framed green (relevant) or red (not)."""
    ok = [r for r in results if not r.error and r.rankings]
    if not ok:
        return
    chosen = ok[0].rankings[:: max(1, len(ok[0].rankings) // queries)][:queries]
    rows = [(q.query, r) for q in chosen for r in ok]
    fig, axes = plt.subplots(len(rows), top + 1, figsize=((top + 1) * 1.3, len(rows) * 1.35), squeeze=False)
    for row, (query, result) in enumerate(rows):
        ranking = next(x for x in result.rankings if x.query == query)
        axes[row][0].imshow(_tile(Path(query), size, None))
        axes[row][0].set_ylabel(result.method, fontsize=6, rotation=0, ha="right", va="center")
        for col in range(top):
            ax = axes[row][col + 1]
            if col < len(ranking.ids):
                colour = "#2ca02c" if ranking.relevant[col] else "#d62728"
                ax.imshow(_tile(dataset.gallery_root / ranking.ids[col], size, colour))
                ax.set_title(f"{ranking.scores[col]:.2f}", fontsize=6, pad=1)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    axes[0][0].set_title("query", fontsize=7)
    fig.suptitle("Top results per method: green = relevant, red = not", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Sequence[MethodResult], dataset: Dataset, out: Path, config: dict[str, Any], env: dict[str, Any],
    command: str,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot_map_vs_latency(results, out / "map_vs_latency.png")
    plot_pr_curves(results, out / "pr_curves.png")
    plot_samples(results, dataset, out / "samples.png")
    payload = {"dataset": dataset.describe(), "command": command, "config": config, **env,
               "methods": [r.summary() for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    depth = f"top {config['top']}" if config.get("top") else "the full ranking"
    seen = "\n".join(f"- **{r.method}**: {r.data_seen}" for r in results)
    hardware = env["hardware"]
    report = f"""# lens eval: {dataset.name}

Reproduce: `{command}`

Dataset: {dataset.describe()}.
Machine: {hardware['cpu']}, {hardware['cores']} cores, torch threads {hardware['torch_threads']}, GPU {hardware['gpu'] or 'none'}; {env['date']}.

{markdown_table(results)}

{failures(results)}

- **mAP**: non-interpolated average precision over {depth}, averaged over the queries that have at least
  one relevant gallery image; tied scores count as the expected value over their orders. A query is never
  counted as its own result.
- **R@k**: fraction of queries with at least one relevant image in the top k.
- **query ms p50**: one query at a time through the public search path (decode excluded; embedding,
  index search and any re-ranking included). **embed ms/img**: batched, while building the index.
- **index KiB**: the search index's own files; **ANN recall@10**: the index's top 10 against exact search
  over the stored vectors (1.0 = exact).
- Scores: {'; '.join(sorted({f'{r.method}: {r.score_kind}' for r in results if not r.error}))}.

What each method learnt from:
{seen}

![mAP against latency](map_vs_latency.png)

![precision-recall](pr_curves.png)

![sample queries](samples.png)
"""
    (out / "report.md").write_text(report)
    return out / "report.md"
