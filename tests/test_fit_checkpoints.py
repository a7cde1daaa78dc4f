"""The checkpoints a fit writes to its ``checkpoint_dir``: the folder checked before the fit."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import pytest

from asyncnn._fit_checkpoints import check_checkpoint_dir

from _checkpoint_cases import _data, _sync_trainer

pytestmark = pytest.mark.timeout(120)


def _read_only(monkeypatch: pytest.MonkeyPatch, under: str) -> None:
    """Files and folders made under ``under`` refused as on a read-only file system (a chmod
    stops no root, who runs the tests in some containers)."""
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path: Any) -> None:
        if os.fspath(path).startswith(under):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            refused(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        refused(path)
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_a_read_only_checkpoint_dir_is_refused_before_any_training(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the fit trained a whole epoch, then raised "OSError: [Errno 30] Read-only file system:
    # '.../epoch-0001'", which named no checkpoint_dir)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tr = _sync_trainer()
    _read_only(monkeypatch, str(folder))
    with pytest.raises(OSError, match=(
        rf"checkpoint_dir '{re.escape(str(folder))}' cannot be written to \(Read-only file "
        rf"system: .*{re.escape(str(folder))}"
        r".*\): give a folder this process can write to; nothing was trained"
    )) as caught:  # fmt: skip
        tr.fit(_data(), batch_size=8, checkpoint_dir=str(folder), checkpoint_every=1)
    assert caught.value.errno == errno.EROFS
    assert (tr.epochs_done, tr.state.minibatches) == (0, 0)
    assert os.listdir(folder) == []


def test_a_missing_checkpoint_dir_is_made_or_refused_naming_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = tmp_path / "new" / "ckpt"
    check_checkpoint_dir(str(made), 0)  # made, and left empty
    assert made.is_dir() and os.listdir(made) == []
    _read_only(monkeypatch, str(tmp_path / "ro"))
    ro = re.escape(str(tmp_path / "ro" / "ckpt"))
    with pytest.raises(OSError, match=rf"checkpoint_dir '{ro}' cannot be written"):
        check_checkpoint_dir(str(tmp_path / "ro" / "ckpt"), 0)
