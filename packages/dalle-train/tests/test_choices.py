"""Picking tokenizers and VAEs by flags, through a test plugin registered with the pluggy hooks.

Entry-point autoloading is off in these tests, so only dalle-core's built-ins and the test
plugin below are registered, whatever else is installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from dalle_core import DiscreteVAE, hookimpl
from dalle_core.interfaces import Tokenizer
from dalle_core.plugins import (
    BLOCK_PLUGINS_ENV,
    DISABLE_AUTOLOAD_ENV,
    get_plugin_manager,
    reset_plugins,
)
from dalle_core.tokenizers import ByteTokenizer
from dalle_train import choices
from dalle_train.choices import (
    add_tokenizer_flags,
    add_vae_flags,
    tokenizer_choice,
    tokenizer_from_args,
    vae_choice,
    vae_from_args,
)
from dalle_train.errors import TrainError


class WordTokenizer(Tokenizer):
    """Whole words of a vocabulary file (one per line) get ids 1..n; other words are dropped."""

    def __init__(self, bpe_path: str | None = None, *, name: str):
        self.plugin_name, self.bpe_path = name, bpe_path
        words = Path(bpe_path).read_text().split() if bpe_path else ["hello", "world"]
        self.ids = {word: i + 1 for i, word in enumerate(words)}
        self.words = {i: word for word, i in self.ids.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.ids) + 1

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in text.split() if word in self.ids]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) in self.words)


class TinyVQGAN(DiscreteVAE):
    """A small VAE standing in for dalle-vae-taming's: registered as ``vqgan``, it records the
    VQGAN files it was given."""

    plugin_name = "vqgan"

    def __init__(self, vqgan_model_path: str | None = None, vqgan_config_path: str | None = None, **kwargs):
        torch.manual_seed(0)
        super().__init__(**{**TINY_VAE, **kwargs})
        self.files = (vqgan_model_path, vqgan_config_path)


TINY_VAE = dict(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)


class PickingPlugin:
    """Tokenizers ``hf``, ``yttm``, ``chinese``, ``words`` (and ``bpe`` when asked), the VAE
    ``vqgan``, and a tokenizer whose library is missing."""

    def __init__(self, with_bpe: bool):
        self.names = ["hf", "yttm", "chinese", "words"] + (["bpe"] if with_bpe else [])

    @hookimpl
    def dalle_register_tokenizers(self, register):
        for name in self.names:
            register(name, lambda name=name, **kwargs: WordTokenizer(name=name, **kwargs),
                     description=f"test tokenizer {name}")
        register("needs-lib", ByteTokenizer, requires=("dalle_missing_library_xyz",))

    @hookimpl
    def dalle_register_vaes(self, register):
        register("vqgan", TinyVQGAN, loader=TinyVQGAN.from_pretrained)


@pytest.fixture
def use_plugin(monkeypatch):
    """Register the test plugin (``use_plugin(with_bpe=...)``) on fresh, isolated plugins."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.delenv(BLOCK_PLUGINS_ENV, raising=False)
    monkeypatch.setattr(choices, "_told_about_default", False)

    def use(with_bpe: bool = False) -> None:
        reset_plugins()
        get_plugin_manager().register(PickingPlugin(with_bpe), name="dalle-test-plugin")

    use()
    yield use
    reset_plugins()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tokenizer_flags(parser)
    add_vae_flags(parser)
    return parser.parse_args(argv)


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("a red circle\n")
    return path


# ------------------------------------------------------------------------------------ tokenizers


def test_tokenizer_by_name(use_plugin):
    tokenizer = tokenizer_from_args(parse("--tokenizer", "words"))
    assert isinstance(tokenizer, WordTokenizer) and tokenizer.plugin_name == "words"
    assert isinstance(tokenizer_from_args(parse("--tokenizer", "bytes")), ByteTokenizer)


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["--bpe_path", "{vocab}"], "yttm"),  # upstream: a YouTokenToMe model
        (["--bpe-path", "{vocab}", "--hug"], "hf"),  # upstream: a Hugging Face JSON
        (["--hug", "--bpe_path", "{vocab}", "--tokenizer", "hf"], "hf"),
        (["--tokenizer", "words", "--bpe_path", "{vocab}"], "words"),
        (["--chinese", "--bpe_path", "{vocab}"], "chinese"),  # another BERT vocabulary
        (["--bpe_path", "{json}"], "hf"),  # upstream would have failed: YouTokenToMe reads no JSON
    ],
)
def test_upstream_tokenizer_flags_pick_a_plugin_and_pass_the_file(use_plugin, vocab, argv, name):
    json = vocab.with_suffix(".json")
    json.write_text(vocab.read_text())
    tokenizer = tokenizer_from_args(parse(*(a.format(vocab=vocab, json=json) for a in argv)))
    assert (tokenizer.plugin_name, tokenizer.bpe_path) == (name, str(json if "{json}" in argv else vocab))
    assert tokenizer.encode("a red square circle") == [1, 2, 3]


def test_chinese_flag(use_plugin):
    assert tokenizer_choice(parse("--chinese")) == ("chinese", {})
    assert tokenizer_from_args(parse("--chinese")).plugin_name == "chinese"


def test_default_is_bytes_said_once_without_bpe(use_plugin, capsys):
    for _ in range(2):
        assert isinstance(tokenizer_from_args(parse()), ByteTokenizer)
    err = capsys.readouterr().err
    assert err.count("dalle-tokenizers is not installed") == 1 and "'bytes'" in err
    assert tokenizer_from_args(parse(), default=None) is None
    assert tokenizer_from_args(parse(), default="words").plugin_name == "words"


def test_default_is_bpe_when_installed(use_plugin, capsys):
    use_plugin(with_bpe=True)
    assert tokenizer_from_args(parse()).plugin_name == "bpe"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hug"], "--hug reads a Hugging Face tokenizer JSON file: give it with --bpe_path FILE"),
        (["--chinese", "--hug", "--bpe_path", "x"], "contradict each other: drop one"),
        (["--tokenizer", "yttm"], "--tokenizer yttm reads a file: give it with --bpe_path FILE"),
        (["--tokenizer", "hf"], "--tokenizer hf reads a file"),
        (["--tokenizer", "words", "--hug", "--bpe_path", "x"], "contradicts --hug"),
        (["--tokenizer", "yttm", "--chinese"], "contradicts --chinese"),
    ],
)
def test_impossible_tokenizer_flags(use_plugin, argv, message):
    with pytest.raises(TrainError, match=message):
        tokenizer_from_args(parse(*argv))


def test_unknown_unusable_and_broken_tokenizers(use_plugin, tmp_path):
    with pytest.raises(TrainError) as error:
        tokenizer_from_args(parse("--tokenizer", "nope"))
    assert str(error.value).startswith("--tokenizer nope: unknown tokenizer 'nope'; available: bytes, ")
    assert "words" in str(error.value)
    use_plugin(with_bpe=False)
    with pytest.raises(TrainError, match="'bpe' is provided by dalle-tokenizers: pip install dalle-tok"):
        tokenizer_from_args(parse("--tokenizer", "bpe"))
    with pytest.raises(TrainError, match="dalle_missing_library_xyz not installed"):
        tokenizer_from_args(parse("--tokenizer", "needs-lib"))
    missing = tmp_path / "missing.model"
    with pytest.raises(TrainError, match=f"--bpe_path {missing}: .*No such file"):
        tokenizer_from_args(parse("--bpe_path", str(missing)))
    with pytest.raises(TrainError, match="--tokenizer bytes --bpe_path x: .*takes no arguments"):
        tokenizer_from_args(parse("--tokenizer", "bytes", "--bpe_path", "x"))


# ------------------------------------------------------------------------------------ VAEs


def saved_vae(directory: Path, vae: torch.nn.Module) -> Path:
    vae.save_pretrained(directory)
    return directory


def test_vae_by_name_and_default(use_plugin):
    vae = vae_from_args(parse("--vae", "vqgan"))
    assert isinstance(vae, TinyVQGAN) and vae.files == (None, None)
    assert vae_from_args(parse()) is None
    assert isinstance(vae_from_args(parse(), default="discrete"), DiscreteVAE)


def test_taming_flags_pick_vqgan_with_its_files(use_plugin):
    assert isinstance(vae_from_args(parse("--taming")), TinyVQGAN)  # the default pretrained VQGAN
    vae = vae_from_args(parse("--taming", "--vqgan_model_path", "m.ckpt", "--vqgan-config-path", "c.yaml"))
    assert vae.files == ("m.ckpt", "c.yaml")
    assert vae_choice(parse("--vae", "vqgan", "--vqgan_model_path", "m", "--vqgan_config_path", "c")) == (
        "vqgan", None, {"vqgan_model_path": "m", "vqgan_config_path": "c"},
    )


def test_vae_path_loads_what_any_plugin_saved(use_plugin, tmp_path):
    torch.manual_seed(1)
    discrete = saved_vae(tmp_path / "discrete", DiscreteVAE(**TINY_VAE))
    loaded = vae_from_args(parse("--vae_path", str(discrete)))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    original = DiscreteVAE.from_pretrained(discrete)
    assert torch.equal(loaded.get_codebook_indices(images), original.get_codebook_indices(images))
    vqgan = saved_vae(tmp_path / "vqgan", TinyVQGAN())
    assert isinstance(vae_from_args(parse("--taming", "--vae-path", str(vqgan))), TinyVQGAN)
    assert isinstance(vae_from_args(parse("--vae", "vqgan", "--vae-path", str(vqgan))), TinyVQGAN)


def test_vae_path_finds_the_newest_checkpoint_of_a_run(use_plugin, tmp_path):
    saved_vae(tmp_path / "run" / "checkpoints" / "step-3", DiscreteVAE(**TINY_VAE))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-3\n")
    assert vae_choice(parse("--vae-path", str(tmp_path / "run"))).path == tmp_path / "run/checkpoints/step-3"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--taming", "--vae-path", "{discrete}"],
         "--taming does not match --vae_path .*, which holds VAE 'discrete'"),
        (["--vae", "vqgan", "--vae-path", "{discrete}"], "--vae vqgan does not match"),
        (["--vae", "discrete", "--vqgan_model_path", "m", "--vqgan_config_path", "c"],
         "are files of a Taming VQGAN, not of VAE 'discrete'"),
        (["--vqgan_model_path", "m", "--vqgan_config_path", "c"], "need --taming"),
        (["--taming", "--vqgan_model_path", "m"], "go together: give both"),
        (["--taming", "--vae", "discrete"], "--taming picks a VQGAN .* not --vae discrete"),
        (["--taming", "--vae-path", "{discrete}", "--vqgan_model_path", "m", "--vqgan_config_path", "c"],
         "already holds a VAE's weights"),
        (["--vae-path", "{missing}"], "does not exist"),
        (["--vae-path", "{file}"], "holds no model"),
    ],
)
def test_impossible_vae_flags(use_plugin, tmp_path, argv, message):
    paths = dict(discrete=saved_vae(tmp_path / "d", DiscreteVAE(**TINY_VAE)), missing=tmp_path / "no",
                 file=tmp_path / "vae.pt")
    paths["file"].write_bytes(b"legacy")
    with pytest.raises(TrainError, match=message):
        vae_from_args(parse(*(a.format(**paths) for a in argv)))


def test_unknown_and_unloadable_vaes(use_plugin, tmp_path):
    with pytest.raises(TrainError, match=r"^--vae openai: unknown VAE 'openai'; available: discrete, "
                                         r"vqgan\. 'openai' is provided by dalle-vae-openai: pip install"):
        vae_from_args(parse("--vae", "openai"))
    broken = saved_vae(tmp_path / "broken", DiscreteVAE(**TINY_VAE))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TrainError, match=f"^--vae_path {broken}: "):
        vae_from_args(parse("--vae-path", str(broken)))
