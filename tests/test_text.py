"""``data=text``: the pinned standard-library corpus, its split, windows, size and hash."""

from __future__ import annotations

import shutil
import sys
import warnings

import pytest
import torch

from lightning_phantom.app.text import (PINNED_PYTHON, PINNED_SHA256, TRAIN_FILES, VAL_FILES, TextDataModule,
                                        read_corpus)


def _setup(**kwargs) -> tuple[TextDataModule, list[str]]:
    data = TextDataModule(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    return data, [str(w.message) for w in caught]


def test_the_pinned_corpus_is_read_split_by_file_and_hashed():
    data, warned = _setup(context=16, train_windows=64, val_windows=8)
    described = data.describe()
    assert not set(TRAIN_FILES) & set(VAL_FILES)
    assert described["files"] == {"train": list(TRAIN_FILES), "val": list(VAL_FILES)} and not described["missing"]
    assert 10**6 < described["bytes"]["train"] < 2 * 10**6 and 10**5 < described["bytes"]["val"] < 2 * 10**5
    for split, files in (("train", TRAIN_FILES), ("val", VAL_FILES)):
        text, _, _ = read_corpus(data.root, files)
        assert len(text) == described["bytes"][split] and text.isascii()  # a byte is a character
    if sys.version.split()[0] == PINNED_PYTHON:
        assert described["sha256"] == PINNED_SHA256 and described["matches_pinned"] and not warned
    else:  # another Python's files: said, not silent
        assert not described["matches_pinned"] and any("not comparable" in w for w in warned)


def test_windows_are_seeded_slices_of_the_text_and_validation_is_fixed():
    data, _ = _setup(context=16, train_windows=64, val_windows=8, seed=3)
    text = data.train_set.text
    for i in range(len(data.train_set)):
        x, y = data.train_set[i]
        start = int(data.train_set.starts[i])
        assert torch.equal(x, text[start:start + 16].long()) and torch.equal(y, text[start + 1:start + 17].long())
    again, _ = _setup(context=16, train_windows=64, val_windows=8, seed=3)
    other, _ = _setup(context=16, train_windows=64, val_windows=8, seed=4)
    assert torch.equal(again.train_set.starts, data.train_set.starts)  # every rank draws the same windows
    assert not torch.equal(other.train_set.starts, data.train_set.starts)
    starts = data.val_set.starts
    assert len(starts) == 8 and starts[0] == 0 and starts[-1] == len(data.val_set.text) - 17  # spread to the end
    assert torch.equal(starts, again.val_set.starts) and torch.equal(starts, other.val_set.starts)
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (32, 16) and batch[0].dtype == torch.long


def test_a_missing_or_changed_file_is_said_and_an_empty_split_refused(tmp_path):
    source = TextDataModule().root
    for name in TRAIN_FILES + VAL_FILES[:1]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, tmp_path / name)
    data, warned = _setup(context=16, train_windows=64, val_windows=8, root=str(tmp_path))
    described = data.describe()
    assert described["missing"] == list(VAL_FILES[1:]) and not described["matches_pinned"]
    assert any("missing: " + ", ".join(VAL_FILES[1:]) in w and "not comparable" in w for w in warned), warned
    (tmp_path / VAL_FILES[0]).unlink()
    with pytest.raises(ValueError, match=r"the validation split of the corpus in .* has 0 bytes \(0 of 6 pinned"):
        _setup(root=str(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    ({"context": 0}, "data.context must be a positive integer, got 0"),
    ({"vocab": 128}, "data.vocab is 256 (tokens are bytes), got 128"),
    ({"train_windows": 8, "batch_size": 16}, "data.train_windows (8) is smaller than data.batch_size (16)"),
])
def test_bad_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TextDataModule(**kwargs)
