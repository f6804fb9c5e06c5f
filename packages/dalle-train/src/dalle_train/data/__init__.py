"""The data dalle-train reads: image-text folders, image folders, the built-in shapes, and
WebDataset shards.

Every dataset yields `Sample` (image ``[C, H, W]`` in [0, 1], caption, source) or None for a
corrupt image; `Batches` turns one into endless, resumable `Batch` es; a `ShardStream` of
shards (`shard_list`) makes its own batches, which `StreamBatches` hands out and resumes;
`SkipReport` counts and names the files that were skipped.
"""

from dalle_train.data.folder import ImageFolder, ImageTextFolder
from dalle_train.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image, random_resized_crop
from dalle_train.data.loader import Batch, Batches
from dalle_train.data.report import SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.shapes import PROMPTS, ShapesDataset, Spec, judge, score, tally
from dalle_train.data.shards import ShardList, shard_list
from dalle_train.data.stream import ShardStream, StreamBatches, WdsKeys

__all__ = [
    "IMAGE_EXTENSIONS",
    "PROMPTS",
    "Batch",
    "Batches",
    "CorruptImageError",
    "ImageFolder",
    "ImageTextFolder",
    "Sample",
    "ShapesDataset",
    "ShardList",
    "ShardStream",
    "SkipReport",
    "Spec",
    "StreamBatches",
    "WdsKeys",
    "judge",
    "load_image",
    "random_resized_crop",
    "score",
    "shard_list",
    "tally",
]
