"""The end-of-run picture: per-task training loss, task weights and validation metrics over steps."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_history"]


def plot_history(history: list[dict], path: str | Path, title: str = "training") -> Path:
    """Write a PNG with three panels (loss, weight, validation score per task) from the trainer's history.

    Args:
        history: rows with ``step`` and ``loss/<task>``, ``weight/<task>``, ``val/<task>/<metric>`` keys.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss/", "training loss (smoothed)"), ("weight/", "task weight"), ("val/", "validation"))
    for ax, (prefix, label) in zip(axes, panels, strict=True):
        keys = sorted(
            {k for row in history for k in row if k.startswith(prefix) and not k.endswith("/score")}
        )
        for key in keys:
            pts = [(row["step"], row[key]) for row in history if key in row]
            if not pts:
                continue
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            if prefix == "loss/" and len(ys) > 5:  # moving average over 5 observations
                ys = [sum(ys[max(0, i - 4) : i + 1]) / len(ys[max(0, i - 4) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, marker="o" if prefix == "val/" else None, label=key[len(prefix) :])
        ax.set_title(label)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
