"""Text tokenizers for dalle, registered as plugins (``--tokenizer NAME``):

- ``bpe`` (`BPETokenizer`, the default): CLIP's byte-level BPE, 49408 ids;
- ``hf`` (`HFTokenizer`): a Hugging Face ``tokenizers`` JSON file;
- ``yttm`` (`YTTMTokenizer`): a YouTokenToMe model (needs youtokentome);
- ``chinese`` (`ChineseTokenizer`): BERT WordPiece, ``bert-base-chinese`` (needs transformers).

`train_bpe` (command ``dalle-train-tokenizer``) trains a BPE for ``hf`` on captions.
`ReferenceBPETokenizer` is the plain upstream tokenizer that ``bpe`` is tested and benchmarked
against. The trainer (dalle-train) picks a tokenizer by name, ``--tokenizer NAME``, or with the
upstream flags ``--bpe_path``, ``--hug`` and ``--chinese``.
"""

from dalle_tokenizers.bpe import BPETokenizer
from dalle_tokenizers.chinese import ChineseTokenizer
from dalle_tokenizers.hf import HFTokenizer
from dalle_tokenizers.reference import ReferenceBPETokenizer
from dalle_tokenizers.train import train_bpe
from dalle_tokenizers.yttm import YTTMTokenizer

__all__ = [
    "BPETokenizer",
    "ChineseTokenizer",
    "HFTokenizer",
    "ReferenceBPETokenizer",
    "YTTMTokenizer",
    "train_bpe",
]
