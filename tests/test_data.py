"""Data sets: digits split is fixed and stratified; an ImageFolder tree made in the test trains."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prelora_ray.config import DataSettings, TrainSettings
from prelora_ray.data import build_datasets
from prelora_ray.trainer import train


def test_digits_split_is_fixed_and_stratified():
    a = build_datasets(DataSettings())
    b = build_datasets(DataSettings())
    assert len(a.train) == 1437 and len(a.val) == 360
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    counts = torch.bincount(a.val.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~36 of each class
    assert a.train.tensors[0].shape[1:] == (1, 8, 8)


def _tree(root, classes=("cat", "dog"), per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = (rng.random((20, 20, 3)) * 80 + 150 * c).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")


def test_imagefolder_tree_loads_and_trains(tmp_path):
    _tree(tmp_path)
    settings = DataSettings(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=4)
    bundle = build_datasets(settings)
    assert bundle.num_classes == 2 and bundle.num_channels == 3 and len(bundle.train) == 12
    x, y = bundle.val[0]
    assert x.shape == (3, 16, 16)
    cfg = TrainSettings.load(
        None,
        [
            "data.name=imagefolder",
            f"data.root={tmp_path}",
            "data.image_size=16",
            "data.batch_size=4",
            "model.patch_size=8",
            "epochs=2",
            "tracking.enabled=false",
            "strategy=full",
        ],
    )
    summary = train(cfg)
    assert 0.0 <= summary["final_val_acc"] <= 1.0
