"""Offline data: Fashion-MNIST from IDX files, ImageFolder (ImageNet layout), and a synthetic set for tests.

Every source yields ``(images, labels)`` batches: images (N, C, H, W) float32 normalised, labels (N,) int64.
Training batches come from ``torch.utils.data.DistributedSampler`` (also with one process), so a
``world_size``-process run sees, step by step, exactly the global batches of a one-process run with the
same global batch size: rank r takes the positions ≡ r (mod world_size) of each global batch.
Nothing is ever downloaded. ``calibration_batches``: the un-augmented training images a norm calibration runs on.
"""

from __future__ import annotations

import gzip
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..models.footprint import check_fits

Batch = tuple[torch.Tensor, torch.Tensor]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and std of the 60k training images' pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("fashion-mnist", "imagefolder", "synthetic")
# What ``calibration_batches`` (and ``python -m adaptive_kernels calibrate``) take by default.
DEFAULT_CALIBRATION_IMAGES = 4096
DEFAULT_CALIBRATION_BATCH = 256


class DataSource(ABC):
    """A classification dataset split into train and test, served as device batches."""

    name: str
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    num_train: int
    num_test: int

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch with a GLOBAL batch of ``batch_size`` (the last partial batch is dropped)."""
        per_rank = _per_rank_batch(batch_size, world_size)
        return (self.num_train // world_size) // per_rank

    @abstractmethod
    def train_batches(
        self, epoch: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
        device: torch.device | str = "cpu", drop_last: bool = True,
    ) -> Iterator[Batch]:
        """This rank's share of each global training batch of ``epoch``, from step ``start_step`` on.

        The order and augmentation depend only on (seed, epoch): a resumed epoch repeats them. A last partial
        batch is dropped (training steps all have the full batch) unless ``drop_last=False``.
        """

    @abstractmethod
    def test_batches(
        self, *, batch_size: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"
    ) -> Iterator[Batch]:
        """This rank's share (samples rank, rank + world_size, ...) of the test set, in order, unaugmented."""

    augment: bool

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "num_classes": self.num_classes, "in_chans": self.in_chans,
            "image_size": list(self.image_size), "num_train": self.num_train, "num_test": self.num_test,
            "augment": self.augment,
        }


class InMemoryImages(DataSource):
    """Images held in memory as uint8 tensors (Fashion-MNIST: 47 MB), batched without a DataLoader.

    train_images/test_images: (N, C, H, W) uint8; labels: (N,) int64. ``augment`` = random crop with
    ``pad`` pixels of zero padding + horizontal flip, drawn per sample from (seed, epoch).
    """

    def __init__(
        self,
        name: str,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = True,
        pad: int = 2,
    ):
        for split, x, y in (("train", train_images, train_labels), ("test", test_images, test_labels)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{name} {split} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{name} {split}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(
                    f"{name} {split} labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
                )
        if train_images.shape[1:] != test_images.shape[1:]:
            raise ValueError(
                f"{name}: train images {tuple(train_images.shape[1:])} vs test {tuple(test_images.shape[1:])}"
            )
        self.name = name
        self.train_images, self.train_labels = train_images, train_labels.long()
        self.test_images, self.test_labels = test_images, test_labels.long()
        self.num_classes = num_classes
        self.in_chans = train_images.shape[1]
        self.image_size = (train_images.shape[2], train_images.shape[3])
        self.num_train, self.num_test = len(train_labels), len(test_labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if self.mean.numel() not in (1, self.in_chans):
            raise ValueError(f"{name}: {self.mean.numel()} mean values for {self.in_chans} channels")
        self.augment, self.pad = augment, pad

    def subset(self, num_train: int | None = None, num_test: int | None = None, seed: int = 0) -> InMemoryImages:
        """A random subset (fixed by ``seed``) of the train and/or test split; ``None`` keeps a split whole."""
        g = torch.Generator().manual_seed(seed)

        def pick(x, y, n, split):
            if n is not None and n > len(y):  # a bigger number than the set holds is a mistake, never clamped
                raise ValueError(f"--{split}-subset {n}: {self.name} has {len(y)} {split} images; give at most "
                                 f"{len(y)} (or drop --{split}-subset for all of them)")
            if n is None or n == len(y):
                return x, y
            if n < 1:
                raise ValueError(f"{split} subset size must be >= 1, got {n}")
            idx = torch.randperm(len(y), generator=g)[:n].sort().values
            return x[idx], y[idx]

        tx, ty = pick(self.train_images, self.train_labels, num_train, "train")
        vx, vy = pick(self.test_images, self.test_labels, num_test, "test")
        return InMemoryImages(self.name, tx, ty, vx, vy, self.num_classes, tuple(self.mean.flatten().tolist()),
                              tuple(self.std.flatten().tolist()), self.augment, self.pad)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255.0) - self.mean) / self.std

    def train_batches(self, epoch, *, batch_size, seed, rank=0, world_size=1, start_step=0, device="cpu",
                      drop_last=True):
        per_rank = _per_rank_batch(batch_size, world_size)
        indices = _epoch_indices(self.num_train, epoch, seed, rank, world_size)
        if self.augment:
            # Drawn for every sample of the set, so a sample's augmentation does not depend on which rank
            # or which batch position it lands in.
            g = torch.Generator().manual_seed(_mix_seed(seed, epoch))
            shifts = torch.randint(0, 2 * self.pad + 1, (self.num_train, 2), generator=g)
            flips = torch.rand(self.num_train, generator=g) < 0.5
        steps = len(indices) // per_rank if drop_last else -(-len(indices) // per_rank)
        for step in range(start_step, steps):
            idx = indices[step * per_rank:(step + 1) * per_rank]
            x = self.train_images[idx]
            if self.augment:
                x = _crop_flip(x, shifts[idx], flips[idx], self.pad)
            yield self._normalize(x).to(device, non_blocking=True), self.train_labels[idx].to(device, non_blocking=True)

    def test_batches(self, *, batch_size, rank=0, world_size=1, device="cpu"):
        idx = torch.arange(rank, self.num_test, world_size)
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            yield self._normalize(self.test_images[b]).to(device), self.test_labels[b].to(device)


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} must be a positive multiple of the {world_size} processes")
    return batch_size // world_size


def _mix_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def _epoch_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def _crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image + horizontal flip. x: (B, C, H, W); shifts: (B, 2) in
    [0, 2·pad]; flips: (B,) bool."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = shifts[:, :1] + torch.arange(h)
    cols = shifts[:, 1:] + torch.arange(w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    # Index all four dims so that the result has plain NCHW strides. (A permuted (B, H, W, 1) tensor counts as
    # contiguous but keeps odd strides, on which torch 2.14's CPU conv backward was seen to corrupt memory.)
    return xp[
        torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
        rows.view(b, 1, h, 1), cols.view(b, 1, 1, w),
    ]


# ---- Fashion-MNIST --------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` or not) into a uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} cannot be read as an IDX file ({e}); reinstall the dataset") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says shape {dims} ({expected} bytes) but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> InMemoryImages:
    """Fashion-MNIST (60k train / 10k test, 28×28, 10 classes) from the four standard IDX files.

    ``data_dir`` defaults to where the Debian package ``dataset-fashion-mnist`` installs them
    (``/usr/share/datasets/fashion-mnist``). Files may be gzipped (``*.gz``) or not.
    """
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {folder} has no {stem}.gz. Install it offline with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to {FASHION_MNIST_DIR}), "
                f"or pass --data-dir pointing to a folder holding the four IDX files "
                f"({', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())})"
            )
        arrays[key] = read_idx(found[0])
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split} files in {folder} disagree: images {x.shape}, labels {y.shape}")
    return InMemoryImages(
        "fashion-mnist",
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        num_classes=10, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
    )


# ---- synthetic --------------------------------------------------------------------------------------------
def make_synthetic(
    num_train: int = 512, num_test: int = 256, num_classes: int = 10, in_chans: int = 1,
    image_size: int = 16, seed: int = 0,
) -> InMemoryImages:
    """A small learnable dataset for tests: each class is a fixed smooth random pattern plus noise."""
    check_fits(2 * 4 * max(num_train, num_test) * in_chans * image_size**2, f"synthetic data of {image_size}x"
               f"{image_size} images", "lower --image-size")
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, in_chans, 4, 4, generator=g)
    prototypes = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def split(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, in_chans, image_size, image_size, generator=g) * 0.15
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return images, labels

    (tx, ty), (vx, vy) = split(num_train), split(num_test)
    return InMemoryImages("synthetic", tx, ty, vx, vy, num_classes, mean=(0.5,), std=(0.25,), augment=True, pad=1)


# ---- ImageFolder ------------------------------------------------------------------------------------------
class _IndexSampler(Sampler[int]):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _SeededTransform(Dataset):
    """``transform`` applied to sample ``i`` of ``dataset`` with torch's RNG seeded from (seed, epoch, i): the
    augmentation of a sample depends neither on the DataLoader worker that loads it nor on where a resumed
    epoch starts. torchvision's transforms draw from torch's global RNG; ``fork_rng`` restores it afterwards
    (with ``num_workers=0`` this runs in the training process)."""

    def __init__(self, dataset: Dataset, transform: Callable, seed: int, epoch: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(self.seed, self.epoch, i))
            return self.transform(image), label


class UnreadableImageError(ValueError):
    """An image file of an ImageFolder that cannot be decoded; the message names the file."""


def _read_image(path: str):
    """torchvision's default loader (PIL, RGB), with an error that names the file and the fix."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        raise UnreadableImageError(f"image {path} cannot be read ({type(e).__name__}: {e}): "
                                   f"remove or replace the file") from None


class ImageFolderData(DataSource):
    """ImageNet-layout folders ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (torchvision).

    Training: RandomResizedCrop + flip (or, without ``augment``, the test transform); test: resize to
    image_size/0.875 + center crop. Loading runs in ``num_workers`` DataLoader workers; each sample's
    augmentation is drawn from (seed, epoch, sample index), so the batches do not depend on ``num_workers``
    and a resume in the middle of an epoch repeats the remaining batches exactly.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 224, num_workers: int = 4, augment: bool = True):
        try:
            import torchvision.datasets as tvd
            import torchvision.transforms as T
        except ImportError as e:
            raise ImportError(
                "--data imagefolder needs torchvision: pip install torchvision (or adaptive_kernels[vision])"
            ) from e
        root = Path(root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"ImageFolder data needs {root / split}/<class name>/<images> (ImageNet layout); it is missing"
                )
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        test_transform = T.Compose(
            [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), normalize]
        )
        train_transform = test_transform
        if augment:
            train_transform = T.Compose(
                [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
            )
        self.train_set = tvd.ImageFolder(root / "train", loader=_read_image)  # transformed by _SeededTransform
        self.train_transform = train_transform
        self.test_set = tvd.ImageFolder(root / "val", test_transform, loader=_read_image)
        if self.train_set.classes != self.test_set.classes:
            raise ValueError(f"{root}: train and val have different class folders")
        self.name = "imagefolder"
        self.num_classes = len(self.train_set.classes)
        self.in_chans = 3
        self.image_size = (image_size, image_size)
        self.num_train, self.num_test = len(self.train_set), len(self.test_set)
        self.num_workers = num_workers
        self.augment = augment

    def _loader(self, dataset, indices, batch_size, generator=None, drop_last=False) -> Iterator:
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=_IndexSampler(indices), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), drop_last=drop_last, generator=generator,
        )
        try:
            yield from loader
        except UnreadableImageError as e:
            # From a worker process, the message is "Caught ... Original Traceback ...": keep its last line's text.
            raise UnreadableImageError(str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]
                                       ) from None

    def describe(self) -> dict[str, Any]:
        # Recorded for the record only: the batches do not depend on it (see _SeededTransform).
        return {**super().describe(), "num_workers": self.num_workers}

    def train_batches(self, epoch, *, batch_size, seed, rank=0, world_size=1, start_step=0, device="cpu",
                      drop_last=True):
        per_rank = _per_rank_batch(batch_size, world_size)
        indices = _epoch_indices(self.num_train, epoch, seed, rank, world_size).tolist()[start_step * per_rank:]
        dataset = _SeededTransform(self.train_set, self.train_transform, seed, epoch)
        # The loader draws its workers' base seed from this generator, not from the global RNG (which dropout
        # uses and checkpoints restore): a resume must not shift it.
        g = torch.Generator().manual_seed(_mix_seed(seed, epoch, rank))
        for x, y in self._loader(dataset, indices, per_rank, generator=g, drop_last=drop_last):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def test_batches(self, *, batch_size, rank=0, world_size=1, device="cpu"):
        for x, y in self._loader(self.test_set, list(range(rank, self.num_test, world_size)), batch_size):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def build_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    image_size: int | None = None,
    num_workers: int = 4,
    augment: bool = True,
    seed: int = 0,
) -> DataSource:
    """The CLI's ``--data`` choices. ``train_subset``/``test_subset`` keep a fixed random subset (in-memory sets;
    the same subset whatever the training seed). ``augment``: random crops and flips of the training images
    (they help long runs; a run of an epoch or two learns faster without). ``seed`` seeds the synthetic images."""
    if name == "fashion-mnist":
        data = load_fashion_mnist(data_dir)
    elif name == "synthetic":
        if data_dir is not None:
            raise ValueError(f"--data-dir {data_dir}: synthetic data is generated, not read; drop --data-dir (or "
                             f"give --data fashion-mnist / imagefolder)")
        data = make_synthetic(image_size=image_size or 16, seed=seed)
    elif name == "imagefolder":
        if data_dir is None:
            raise ValueError("--data imagefolder needs --data-dir ROOT (holding train/ and val/ class folders)")
        if train_subset is not None or test_subset is not None:
            raise ValueError("--train-subset/--test-subset work with in-memory datasets only, not imagefolder")
        return ImageFolderData(data_dir, image_size=image_size or 224, num_workers=num_workers, augment=augment)
    else:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if image_size is not None and image_size != data.image_size[0] and name != "synthetic":
        raise ValueError(
            f"{name} images are {data.image_size[0]}x{data.image_size[1]}; --image-size cannot change that"
        )
    if train_subset is not None or test_subset is not None:
        data = data.subset(train_subset, test_subset)
    data.augment = augment
    return data


def calibration_batches(
    data: DataSource,
    num_images: int = DEFAULT_CALIBRATION_IMAGES,
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """The first ``num_images`` training images of epoch 0's shuffled order (``seed``), un-augmented, in batches
    of ``batch_size`` (normalised as for training; the last one may be smaller); fewer when the training set has
    fewer images (a single image left over is not used: batch statistics need 2).
    Raises at once on bad arguments."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"calibration {name} must be an int >= 2 (batch statistics need 2 images), got {value!r}")
    if getattr(data, "augment", False):
        raise ValueError(f"{data.name}: calibrate on un-augmented images (build the data with augment=False): "
                         f"statistics of random crops are not those of the images the model will see")

    def batches() -> Iterator[torch.Tensor]:
        left = min(num_images, data.num_train)
        for x, _ in data.train_batches(0, batch_size=min(batch_size, left), seed=seed, drop_last=False):
            take = min(left, len(x))
            if take < 2:
                break
            yield x[:take]
            left -= take

    return batches()
