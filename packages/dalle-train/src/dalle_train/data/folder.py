"""Datasets over folders of files: images with captions (DALLE, CLIP), images alone (the VAE).

Every random choice (the caption line, the crop) is drawn from a generator seeded with
``mix(seed, epoch, index)``, so an item is a pure function of those three numbers: a resumed
run, or a DataLoader worker, draws exactly what an uninterrupted single process would. Call
`set_epoch` at each epoch (`Batches` does it for you through `load`).

Bad files never stop training. Missing pairs and empty captions are found while scanning and
reported then; a corrupt or truncated image is only found when it is loaded: it is reported
once, and the item is None, which `Batches` drops from its batch (that batch is one smaller).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dalle_train.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image, random_resized_crop
from dalle_train.data.report import SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.scan import CAPTION_EXTENSION, Pair, check_folder, scan_images, scan_pairs
from dalle_train.data.seeding import generator
from dalle_train.errors import TrainError
from dalle_train.imageio import to_tensor


class _FolderDataset(Dataset):
    """What both folder datasets share: settings, epochs, loading and cropping one image."""

    def __init__(
        self, root: Path, image_size: int, channels: int, resize_ratio: float, seed: int,
        report: SkipReport | None,
    ) -> None:
        if image_size < 1:
            raise TrainError(f"image size must be a positive number of pixels, not {image_size}")
        if channels not in (3, 4):
            raise TrainError(f"channels must be 3 (RGB) or 4 (RGBA, --transparent), not {channels}")
        if not 0 < resize_ratio <= 1:
            raise TrainError(
                f"the random crop's lower area ratio (--random-resize-crop-lower-ratio) must be in "
                f"(0, 1], not {resize_ratio}"
            )
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.resize_ratio = resize_ratio
        self.seed = seed
        self.report = SkipReport() if report is None else report
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch `__getitem__` draws its random choices for."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample | None:
        """Item ``index`` of the current epoch (see `load`)."""
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int) -> Sample | None:
        """Item ``index`` with the random choices of ``epoch``; None if its image is corrupt."""
        raise NotImplementedError

    def _image(self, path: Path, generator: torch.Generator) -> torch.Tensor | None:
        """``path`` read, randomly cropped and resized: ``[C, S, S]`` in [0, 1], or None
        (reported) when the file cannot be decoded."""
        try:
            image = load_image(path, self.channels)
        except CorruptImageError as error:
            self.report.add("corrupt_image", str(path), error.reason)
            return None
        image = random_resized_crop(image, self.image_size, self.resize_ratio, generator)
        return to_tensor(image)  # [C, S, S]


class ImageTextFolder(_FolderDataset):
    """Images (png, jpg, jpeg, bmp, webp, any case) with a ``.txt`` of the same stem beside
    them, nested at any depth; one caption per sample, drawn from the file's non-empty lines.

    ``root``: the folder; ``image_size``: the side of the square images it yields;
    ``channels``: 3 (RGB; transparency laid over white) or 4 (RGBA, transparency kept);
    ``resize_ratio``: the smallest area fraction of the random square crop (1: the largest
    centred square); ``seed``: with the epoch and index, every random choice; ``report``: where
    skipped files are counted (a new `SkipReport` when None).

    ``pairs`` lists every usable (image, caption lines) pair in a fixed order (index order),
    so a trainer can check caption lengths before it starts. Raises `TrainError` when the
    folder is missing or holds no usable pair, saying what it found.
    """

    def __init__(
        self, root: str | Path, image_size: int, channels: int = 3, resize_ratio: float = 0.75,
        seed: int = 0, report: SkipReport | None = None,
    ) -> None:
        what = f"images ({', '.join(IMAGE_EXTENSIONS)}) with {CAPTION_EXTENSION} captions of the same name"
        root = check_folder(root, what)
        super().__init__(root, image_size, channels, resize_ratio, seed, report)
        pairs, found = scan_pairs(root, self.report)
        self.pairs: list[Pair] = pairs
        if not self.pairs:
            skipped = f"; {self.report.summary()}" if self.report.count() else ""
            raise TrainError(
                f"{root} holds no usable image-text pair: found {found.describe()}{skipped}. "
                f"Each image needs a {CAPTION_EXTENSION} file of the same name beside it "
                f"(cat.png + cat.txt) with at least one line of text"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int, epoch: int) -> Sample | None:
        """Sample ``index`` as drawn in ``epoch``: a random caption line and a random crop;
        None when the image turns out to be corrupt (reported once)."""
        pair = self.pairs[index]
        rng = generator(self.seed, epoch, index)
        caption = pair.captions[int(torch.randint(len(pair.captions), (1,), generator=rng))]
        image = self._image(pair.image, rng)
        return None if image is None else Sample(image, caption, str(pair.image))


class ImageFolder(_FolderDataset):
    """Every image (png, jpg, jpeg, bmp, webp, any case) under ``root``, flat or nested at any
    depth (no class subfolders needed), for training the VAE; captions are "".

    The arguments are those of `ImageTextFolder`. ``images`` lists the files in index order.
    Raises `TrainError` when the folder is missing or holds no image, saying what it found.
    """

    def __init__(
        self, root: str | Path, image_size: int, channels: int = 3, resize_ratio: float = 0.75,
        seed: int = 0, report: SkipReport | None = None,
    ) -> None:
        root = check_folder(root, f"images ({', '.join(IMAGE_EXTENSIONS)})")
        super().__init__(root, image_size, channels, resize_ratio, seed, report)
        self.images, found = scan_images(root)
        if not self.images:
            raise TrainError(
                f"{root} holds no image: found {found.describe()}; "
                f"images must end in {', '.join(IMAGE_EXTENSIONS)} (any case)"
            )

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, epoch: int) -> Sample | None:
        """Image ``index`` with the crop drawn for ``epoch``; None when it is corrupt."""
        path = self.images[index]
        image = self._image(path, generator(self.seed, epoch, index))
        return None if image is None else Sample(image, "", str(path))
