"""Offline data: IDX parsing, Fashion-MNIST, the DDP-consistent sampler, augmentation, ImageFolder."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from adaptive_kernels.training.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ImageFolderData,
    InMemoryImages,
    _crop_flip,
    build_data,
    load_fashion_mnist,
    make_synthetic,
    read_idx,
)


def write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def fake_fashion_mnist(folder, n_train=7, n_test=5, compress=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test),
    }
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(folder / (stem + (".gz" if compress else "")), arrays[key], compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_loader_reads_idx_files(tmp_path, compress):
    arrays = fake_fashion_mnist(tmp_path, compress=compress)
    data = load_fashion_mnist(tmp_path)
    assert (data.num_train, data.num_test, data.num_classes, data.in_chans, data.image_size) == (7, 5, 10, 1, (28, 28))
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(arrays["train_images"].astype(np.uint8)))
    assert torch.equal(data.test_labels, torch.from_numpy(arrays["test_labels"]).long())


def test_bad_idx_files_are_reported(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match="bad.gz is not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match=r"header says shape \[10\] \(10 bytes\) but holds 2 bytes"):
        read_idx(tmp_path / "short")


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_data("fashion-mnist", tmp_path)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist()
    assert (data.num_train, data.num_test) == (60000, 10000)
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    # Independent parse of the first test image: 16-byte header, then row-major bytes.
    with gzip.open(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(16 + 784), dtype=np.uint8)[16:].reshape(28, 28)
    assert torch.equal(data.test_images[0, 0], torch.from_numpy(raw.copy()))
    x, _ = next(data.test_batches(batch_size=10000))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # normalised with the set's statistics


def synthetic(n=50, **kw):
    return make_synthetic(num_train=n, num_test=9, num_classes=3, image_size=6, **kw)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_exactly_the_global_batches_of_one_process(world_size):
    """Rank r's batch j = positions ≡ r (mod world_size) of the single-process global batch j (same images,
    same augmentation), so DDP with global batch B trains on what one process with batch B trains on."""
    data = synthetic()
    batch = 6
    single = list(data.train_batches(1, batch_size=batch, seed=5))
    ranks = [list(data.train_batches(1, batch_size=batch, seed=5, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert len(single) == data.steps_per_epoch(batch) == 50 // 6
    for r in range(world_size):
        assert len(ranks[r]) == data.steps_per_epoch(batch, world_size) == len(single)
        for (x, y), (gx, gy) in zip(ranks[r], single):
            assert torch.equal(x, gx[r::world_size]) and torch.equal(y, gy[r::world_size])


def test_epochs_shuffle_differently_and_repeat_exactly():
    data = synthetic()
    a = torch.cat([y for _, y in data.train_batches(0, batch_size=5, seed=1)])
    again = torch.cat([y for _, y in data.train_batches(0, batch_size=5, seed=1)])
    b = torch.cat([x for x, _ in data.train_batches(1, batch_size=5, seed=1)])
    assert torch.equal(a, again)
    assert not torch.equal(torch.cat([x for x, _ in data.train_batches(0, batch_size=5, seed=1)]), b)
    resumed = list(data.train_batches(0, batch_size=5, seed=1, start_step=3))
    whole = list(data.train_batches(0, batch_size=5, seed=1))
    assert len(resumed) == len(whole) - 3
    assert all(torch.equal(x, wx) for (x, _), (wx, _) in zip(resumed, whole[3:]))


def test_crop_flip_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 7, 6), generator=g, dtype=torch.uint8)
    shifts = torch.randint(0, 5, (5, 2), generator=g)
    flips = torch.tensor([True, False, True, True, False])
    out = _crop_flip(x, shifts, flips, pad=2)
    for i in range(5):
        padded = torch.zeros(3, 11, 10, dtype=torch.uint8)
        padded[:, 2:9, 2:8] = x[i]
        want = padded[:, shifts[i, 0]:shifts[i, 0] + 7, shifts[i, 1]:shifts[i, 1] + 6]
        assert torch.equal(out[i], want.flip(-1) if flips[i] else want)
    assert out.stride() == (3 * 7 * 6, 7 * 6, 6, 1)  # plain NCHW strides


def test_test_batches_are_normalised_and_sharded():
    data = synthetic()
    x, _ = next(data.test_batches(batch_size=100))
    want = (data.test_images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, want)
    shards = [torch.cat([y for _, y in data.test_batches(batch_size=2, rank=r, world_size=2)]) for r in range(2)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.sort(data.test_labels).values)


def test_subset_is_fixed_and_checked():
    data = synthetic()
    a, b = data.subset(num_train=20), data.subset(num_train=20)
    assert a.num_train == 20 and a.num_test == data.num_test and torch.equal(a.train_images, b.train_images)
    with pytest.raises(ValueError, match="subset size must be >= 1"):
        data.subset(num_train=0)
    with pytest.raises(ValueError, match="global batch size 5 must be a positive multiple of the 2 processes"):
        next(data.train_batches(0, batch_size=5, seed=0, world_size=2))


def test_in_memory_images_validate_their_input():
    x, y = torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        InMemoryImages("t", x, y, x, y, 3, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="must be uint8"):
        InMemoryImages("t", x.float(), y, x, y, 4, (0.5,), (0.5,))


def test_build_data_errors():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        build_data("cifar")
    with pytest.raises(ValueError, match="needs --data-dir"):
        build_data("imagefolder")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = build_data("imagefolder", tmp_path, image_size=8, num_workers=0)
    assert isinstance(data, ImageFolderData)
    assert (data.num_classes, data.num_train, data.num_test, data.image_size) == (2, 8, 4, (8, 8))
    batches = list(data.train_batches(0, batch_size=4, seed=0))
    assert len(batches) == data.steps_per_epoch(4) == 2
    assert batches[0][0].shape == (4, 3, 8, 8) and batches[0][1].dtype == torch.int64
    # Same sample order (labels) on a second pass of the same epoch; resuming at step 1 gives the second batch.
    assert torch.equal(torch.cat([y for _, y in data.train_batches(0, batch_size=4, seed=0)]),
                       torch.cat([y for _, y in batches]))
    assert torch.equal(next(data.train_batches(0, batch_size=4, seed=0, start_step=1))[1], batches[1][1])
    test = list(data.test_batches(batch_size=3))
    assert [len(y) for _, y in test] == [3, 1] and sorted(torch.cat([y for _, y in test]).tolist()) == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match=r"train/train/<class name>/<images> \(ImageNet layout\)"):
        ImageFolderData(tmp_path / "train")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_error_naming_the_file(tmp_path, workers):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    broken = tmp_path / "val" / "dog" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = build_data("imagefolder", tmp_path, image_size=8, num_workers=workers)
    with pytest.raises(ValueError, match=f"image {broken} cannot be read .*: remove or replace the file") as e:
        list(data.test_batches(batch_size=3))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
