"""dalle-tokenizers' registrations (entry point ``dalle_tokenizers`` in group ``dalle``).

Only this package's light modules are imported here; youtokentome and transformers are imported
when a ``yttm`` or ``chinese`` tokenizer is built, and ``requires`` lets the registry say when
they are missing.
"""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register
from dalle_tokenizers.bpe import BPETokenizer
from dalle_tokenizers.chinese import INSTALL as CHINESE_INSTALL
from dalle_tokenizers.chinese import ChineseTokenizer
from dalle_tokenizers.hf import HFTokenizer
from dalle_tokenizers.yttm import INSTALL as YTTM_INSTALL
from dalle_tokenizers.yttm import YTTMTokenizer


@hookimpl
def dalle_register_tokenizers(register: Register) -> None:
    register(BPETokenizer.plugin_name, BPETokenizer, requires=("ftfy", "regex"),
             description="CLIP byte-level BPE, 49408 ids, lower case (the default)")
    register(HFTokenizer.plugin_name, HFTokenizer, requires=("tokenizers",),
             description="Hugging Face tokenizers JSON file (bpe_path=tokenizer.json)")
    register(YTTMTokenizer.plugin_name, YTTMTokenizer, requires=("youtokentome",), install=YTTM_INSTALL,
             description=f"YouTokenToMe BPE model (bpe_path=bpe.model); needs: {YTTM_INSTALL}")
    register(ChineseTokenizer.plugin_name, ChineseTokenizer, requires=("transformers",),
             install=CHINESE_INSTALL,
             description="BERT WordPiece (bert-base-chinese, or a folder / vocab.txt); needs: "
                         f"{CHINESE_INSTALL}")
