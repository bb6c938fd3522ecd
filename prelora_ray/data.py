"""Data set registry: digits (embedded), synthetic, cifar10/cifar100 and ImageNet-style folders.

`check_data` does the cheap checks (paths exist and hold images) so that a bad path fails before
Ray starts; `build_datasets` loads. Sharding across workers is the training loop's job (a seeded
DistributedSampler), so every data set here is a plain map-style `Dataset`. `make_train_loader` builds
the loop's train DataLoader (benchmarks/gpu_check.py times it alone), with `data.loader_workers`
resolved for the device by `resolve_loader_workers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from prelora_ray.config import DataSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SPLIT_SEED = 0  # fixed: the digits train/val split never changes with the run seed


@dataclass(frozen=True, kw_only=True)
class DatasetBundle:
    """Train and validation sets with the shape the model must take."""

    train: Dataset
    val: Dataset
    num_classes: int
    image_size: int
    num_channels: int


def default_image_size(settings: DataSettings) -> int:
    """The image side the model gets when data.image_size is not set."""
    if settings.image_size is not None:
        return settings.image_size
    return {"digits": 8, "cifar10": 32, "cifar100": 32}.get(settings.name, 224)


def num_channels(settings: DataSettings) -> int:
    """Input channels: 1 for digits, 3 for the others."""
    return 1 if settings.name == "digits" else 3


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def check_data(settings: DataSettings) -> None:
    """Fail fast with a one-line ValueError naming data.root when the data cannot be there."""
    if settings.name in ("digits", "synthetic"):
        return
    root = Path(settings.root).expanduser()
    if settings.name in ("cifar10", "cifar100"):
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[settings.name]
        if not settings.download and not (root / folder).is_dir():
            raise ValueError(
                f"data.root={settings.root!r} has no {folder}/ folder: point it at the extracted "
                f"{settings.name} data or set data.download=true"
            )
        return
    for split in ("train", "val"):
        sub = root / split
        if not sub.is_dir():
            raise ValueError(
                f"data.root={settings.root!r} has no {split}/ folder: "
                "imagefolder needs root/train/<class>/*.png and root/val/<class>/*.png"
            )
        if not _has_images(sub):
            raise ValueError(f"data.root={settings.root!r}: {split}/ holds no images ({', '.join(IMAGE_SUFFIXES)})")


def _digits(settings: DataSettings) -> DatasetBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=0.2, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    size = default_image_size(settings)
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return DatasetBundle(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10,
        image_size=size,
        num_channels=1,
    )


def _synthetic(settings: DataSettings) -> DatasetBundle:
    """Class prototypes plus noise: learnable, shape-configurable, no files."""
    size = default_image_size(settings)
    gen = torch.Generator().manual_seed(1234)
    protos = torch.randn(settings.synthetic_classes, 3, size, size, generator=gen)

    def make(n: int) -> TensorDataset:
        labels = torch.randint(0, settings.synthetic_classes, (n,), generator=gen)
        images = protos[labels] + 0.8 * torch.randn(n, 3, size, size, generator=gen)
        return TensorDataset(images, labels)

    return DatasetBundle(
        train=make(settings.synthetic_samples),
        val=make(max(1, settings.synthetic_samples // 4)),
        num_classes=settings.synthetic_classes,
        image_size=size,
        num_channels=3,
    )


def image_transforms(settings: DataSettings, *, train: bool, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
    """The usual ViT recipe: RandomResizedCrop + flip + RandAugment to train, resize + center crop to validate."""
    from torchvision import transforms as T

    size = default_image_size(settings)
    if train:
        steps = [T.RandomResizedCrop(size, scale=(0.35 if size <= 64 else 0.08, 1.0)), T.RandomHorizontalFlip()]
        if settings.randaugment:
            steps.append(T.RandAugment(num_ops=2, magnitude=9))
    else:
        steps = [T.Resize(int(round(size / 0.875))), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _torchvision(settings: DataSettings) -> DatasetBundle:
    from torchvision import datasets

    root = str(Path(settings.root).expanduser())
    if settings.name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if settings.name == "cifar10" else datasets.CIFAR100
        train = cls(root, train=True, download=settings.download, transform=image_transforms(settings, train=True))
        val = cls(root, train=False, download=settings.download, transform=image_transforms(settings, train=False))
        num_classes = 10 if settings.name == "cifar10" else 100
    else:
        train = datasets.ImageFolder(str(Path(root) / "train"), transform=image_transforms(settings, train=True))
        val = datasets.ImageFolder(str(Path(root) / "val"), transform=image_transforms(settings, train=False))
        if train.classes != val.classes:
            raise ValueError(f"data.root={settings.root!r}: train/ and val/ have different class folders")
        num_classes = len(train.classes)
    return DatasetBundle(
        train=train, val=val, num_classes=num_classes, image_size=default_image_size(settings), num_channels=3
    )


def build_datasets(settings: DataSettings) -> DatasetBundle:
    """Load the data set named by settings.name (after check_data)."""
    check_data(settings)
    if settings.name == "digits":
        return _digits(settings)
    if settings.name == "synthetic":
        return _synthetic(settings)
    return _torchvision(settings)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (narrowed by containers, taskset, Slurm), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def resolve_loader_workers(settings: DataSettings, device: torch.device | str, cpus: int | None = None) -> int:
    """DataLoader worker processes for `data.loader_workers` on `device`: an explicit integer as given; None (auto):

    - 0 on CPU: worker processes would take cores from the training threads that do the real work;
    - 0 for digits: an 8x8 batch is assembled in microseconds, cheaper than starting workers each epoch;
    - otherwise on CUDA min(8, cpus - 1) (`cpus`: available_cpus()): decoding and augmenting on every core
      but the one that drives the GPU, capped at the 8 of the paper's config (search_spaces/paper_vit_large.yaml).
    """
    if settings.loader_workers is not None:
        return settings.loader_workers
    if torch.device(device).type != "cuda" or settings.name == "digits":
        return 0
    return max(1, min(8, (cpus if cpus is not None else available_cpus()) - 1))


class ChunkedBatches(Sampler[list[int]]):
    """Batches of `batch_size` indices of `sampler`, each laid out chunk by chunk for `chunks` equal chunks.

    Chunk l of a batch (its rows l·b/c ... (l+1)·b/c − 1) holds the indices at positions l, l + c, l + 2c, ...
    of the sampler's batch; a last short batch is dropped. With W workers sharing one seeded
    DistributedSampler (worker r draws positions r, r + W, ... of one permutation), chunk l of worker r's
    step-k batch is then the permutation's positions G·k + (r + W·l) + H·i (G the batch over all workers,
    H = W·c the chunks over all workers): global chunk r + W·l sees the same samples whatever W is.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, chunks: int) -> None:
        if batch_size % chunks:
            raise ValueError(f"a batch of {batch_size} cannot be cut into {chunks} equal chunks")
        self.sampler, self.batch_size, self.chunks = sampler, batch_size, chunks

    def __iter__(self):
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield [i for chunk in range(self.chunks) for i in batch[chunk :: self.chunks]]
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def make_train_loader(
    dataset: Dataset,
    settings: DataSettings,
    device: torch.device | str,
    *,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    chunks: int = 1,
) -> tuple[DataLoader, DistributedSampler]:
    """The training loop's train loader and its sampler: this worker's shard through a seeded DistributedSampler,
    `resolve_loader_workers` processes, pinned memory on CUDA (asynchronous copies to the GPU).

    `chunks` > 1 (LTE's heads on the worker): each batch is laid out for that many equal chunks and a last short
    batch is dropped (`ChunkedBatches`).

    Workers are not persistent, on purpose: each epoch's iterator draws its workers' seed from the global RNG,
    which checkpoints save and restore, so a resumed or forked run augments exactly as an uninterrupted one;
    persistent workers would draw it once and carry their RNG streams across epochs. Their start-up each epoch
    is measured by benchmarks/gpu_check.py (`first_batch_s`).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = {
        "num_workers": resolve_loader_workers(settings, device),
        "pin_memory": torch.device(device).type == "cuda",
    }
    if chunks > 1:
        loader = DataLoader(dataset, batch_sampler=ChunkedBatches(sampler, settings.batch_size, chunks), **common)
    else:
        loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, **common)
    return loader, sampler
