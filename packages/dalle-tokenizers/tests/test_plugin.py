"""Registration: every tokenizer is listed by this package, and the package imports and lists
them on a machine without its optional libraries (youtokentome, transformers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from dalle_core.plugins import create_tokenizer, default_tokenizer_name, describe_plugins, registry
from dalle_tokenizers import BPETokenizer
from dalle_tokenizers.chinese import INSTALL as CHINESE_INSTALL
from dalle_tokenizers.yttm import INSTALL as YTTM_INSTALL

NAMES = ("bpe", "hf", "yttm", "chinese")


def test_registered_by_this_package() -> None:
    tokenizers = registry("tokenizers")
    for name in NAMES:
        assert tokenizers[name].package == "dalle-tokenizers"
        assert tokenizers[name].factory.plugin_name == name
    assert isinstance(create_tokenizer("bpe"), BPETokenizer)
    rows = {row.name: row for row in describe_plugins() if row.kind == "tokenizers"}
    assert "--no-build-isolation youtokentome==1.0.6" in rows["yttm"].description



def test_bpe_is_the_default_tokenizer_of_a_dalle_built_without_one() -> None:
    """As upstream: ``generate_texts`` of a DALLE built in Python decodes with CLIP's BPE."""
    import torch

    from dalle_core import DALLE, DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=8, codebook_dim=8, hidden_dim=8)
    dalle = DALLE(dim=16, vae=vae, num_text_tokens=49408, text_seq_len=6, depth=1, heads=2, dim_head=8)
    assert default_tokenizer_name() == "bpe"
    tokens, texts = dalle.generate_texts("a cat", generator=torch.Generator().manual_seed(0))
    bpe = create_tokenizer("bpe")
    assert tokens[0, :2].tolist() == bpe.encode("a cat") and texts == [bpe.decode(tokens[0])]

#: run in a fresh interpreter where importing youtokentome or transformers fails
WITHOUT_OPTIONAL_LIBRARIES = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"youtokentome", "transformers"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Blocker())

    import dalle_tokenizers
    from dalle_core.plugins import create_tokenizer, describe_plugins

    report = {"rows": [row._asdict() for row in describe_plugins() if row.kind == "tokenizers"],
              "bpe": create_tokenizer("bpe").encode("two cats")}
    for name, build in [
        ("registry yttm", lambda: create_tokenizer("yttm", bpe_path=sys.argv[1])),
        ("registry chinese", lambda: create_tokenizer("chinese")),
        ("class yttm", lambda: dalle_tokenizers.YTTMTokenizer(sys.argv[1])),
        ("class chinese", lambda: dalle_tokenizers.ChineseTokenizer()),
    ]:
        try:
            build()
        except ImportError as error:
            report[name] = str(error)
    optional = {"youtokentome", "transformers"}
    report["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in optional)
    print(json.dumps(report))
    """
)


def test_imports_and_lists_without_optional_libraries(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPTIONAL_LIBRARIES, str(tmp_path / "bpe.model")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["name"]: row for row in report["rows"]}
    assert set(NAMES) <= set(rows)
    assert rows["bpe"]["usable"] and rows["hf"]["usable"]
    missing = (("yttm", "youtokentome", YTTM_INSTALL), ("chinese", "transformers", CHINESE_INSTALL))
    for name, module, install in missing:
        reason = f"{module} not installed; install it with: {install}"
        assert rows[name] | {"usable": False, "reason": reason} == rows[name]
    assert report["bpe"] == create_tokenizer("bpe").encode("two cats")
    # through the registry: what is missing; the listing's description says how to install it
    assert "youtokentome not installed" in report["registry yttm"]
    assert "transformers not installed" in report["registry chinese"]
    # the classes themselves: the exact install commands
    assert "pip install Cython setuptools wheel && pip install --no-build-isolation youtokentome==1.0.6" in (
        report["class yttm"]
    )
    assert 'pip install "dalle-tokenizers[chinese]"' in report["class chinese"]
    assert report["loaded"] == []
