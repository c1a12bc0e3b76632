"""Training curves: loss and accuracy per epoch as a PNG next to the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookalike.figures import save_figure


def plot_history(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw train/validation loss and validation accuracy per epoch into ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    try:
        loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
        loss_ax.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation")
        loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
        loss_ax.legend()
        acc_ax.plot(epochs, [row["val_accuracy"] for row in history], "o-", color="tab:green")
        acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation classifier accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        path = save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
