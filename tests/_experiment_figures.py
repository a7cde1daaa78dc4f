"""What the experiments' tests share about their figures: the titles a script gives them."""

from __future__ import annotations

from typing import Any

import _common
import pytest


def figure_titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The titles (figure's, then each panel's) of every figure the script saves, with
    ``_common.cpu_label`` saying 16 cores."""
    monkeypatch.setattr(_common, "cpu_label", lambda: "16-core CPU")
    titles: list[str] = []
    save = _common.save_figure

    def record(fig: Any, out: str, name: str) -> str:
        titles.extend([fig.get_suptitle(), *(a.get_title() for a in fig.axes)])
        return save(fig, out, name)

    monkeypatch.setattr(_common, "save_figure", record)
    return titles
