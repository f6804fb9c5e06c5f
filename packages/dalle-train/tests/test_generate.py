"""``dalle-train generate`` on a tiny DALLE saved in the test: files, determinism, the flags'
meaning (compared with calling `DALLE.generate_images` directly), CLIP ranking and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_core import CLIP, DALLE, DiscreteVAE
from dalle_core.plugins import DISABLE_AUTOLOAD_ENV, reset_plugins
from dalle_core.tokenizers import ByteTokenizer
from dalle_train import cli
from dalle_train.commands.generate import prompt_seed
from dalle_train.imageio import to_tensor
from dalle_train.pictures import slug

TEXT_SEQ_LEN = 16
PROMPTS = ("a red circle", "a blue square")


@pytest.fixture(autouse=True)
def only_builtin_plugins(monkeypatch):
    """Only dalle-core's plugins, whatever else is installed."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reset_plugins()
    torch.set_num_threads(1)
    yield
    reset_plugins()


def tiny_vae(**overrides) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(**{**dict(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8),
                          **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny DALLE (16 px images, 4 x 4 codes, bytes tokenizer) saved with save_pretrained."""
    torch.manual_seed(0)
    dalle = DALLE(dim=32, vae=tiny_vae(), num_text_tokens=ByteTokenizer().vocab_size,
                  text_seq_len=TEXT_SEQ_LEN, depth=2, heads=2, dim_head=16, tokenizer=ByteTokenizer())
    directory = tmp_path_factory.mktemp("dalle") / "model"
    dalle.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    clip = CLIP(dim_text=16, dim_image=16, dim_latent=16, num_text_tokens=257, text_enc_depth=1,
                text_seq_len=TEXT_SEQ_LEN, text_heads=2, visual_enc_depth=1, visual_heads=2,
                visual_image_size=16, visual_patch_size=8)
    directory = tmp_path_factory.mktemp("clip") / "clip"
    clip.save_pretrained(directory)
    return directory


def generate(model: Path, out: Path, *extra: str, text: str = "|".join(PROMPTS)) -> int:
    return cli.main(["generate", "--dalle_path", str(model), "--text", text, "--outputs_dir", str(out),
                     "--num_images", "3", "--batch_size", "2", "--device", "cpu", *extra])


def read_images(folder: Path, count: int = 3) -> torch.Tensor:
    images = []
    for i in range(count):
        with Image.open(folder / f"{i}.png") as image:
            assert image.format == "PNG" and image.size == (16, 16)
            images.append(to_tensor(image.convert("RGB")))
    return torch.stack(images)


def test_writes_images_grid_and_caption_per_prompt(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "out", "--seed", "7") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(map(slug, PROMPTS))
    for prompt in PROMPTS:
        folder = tmp_path / "out" / slug(prompt)
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["0.png", "1.png", "2.png", "caption.txt", "grid.png"]
        read_images(folder)
        with Image.open(folder / "grid.png") as grid:  # 2 per row, 16 px upscaled 8 x, padding 2
            assert grid.size == (2 + 2 * (128 + 2), 2 + 2 * (128 + 2))
        assert (folder / "caption.txt").read_text() == prompt + "\n"
    assert f"3 images for 'a red circle' in {tmp_path / 'out' / 'a-red-circle'}" in capsys.readouterr().out


def test_same_seed_same_images_and_the_flags_mean_what_generate_images_does(model_dir, tmp_path):
    sampling = ["--top_k", "0.5", "--top-p", "0.9", "--temperature", "0.8", "--cond-scale", "2"]
    generate(model_dir, tmp_path / "a", "--seed", "3", *sampling)
    generate(model_dir, tmp_path / "b", "--seed", "3", *sampling, text="a blue square")  # alone
    generate(model_dir, tmp_path / "c", "--seed", "4", *sampling)
    first = read_images(tmp_path / "a" / "a-blue-square")
    assert torch.equal(first, read_images(tmp_path / "b" / "a-blue-square"))
    assert not torch.equal(first, read_images(tmp_path / "c" / "a-blue-square"))

    dalle = DALLE.from_pretrained(model_dir).eval()
    text = ByteTokenizer().tokenize(["a blue square"], TEXT_SEQ_LEN)
    generator = torch.Generator().manual_seed(prompt_seed(3, "a blue square"))
    expected = torch.cat([
        dalle.generate_images(text.expand(n, -1), filter_thres=0.5, top_p=0.9, temperature=0.8,
                              cond_scale=2.0, generator=generator)
        for n in (2, 1)  # --num_images 3 in batches of 2
    ])
    assert torch.allclose(first, expected, atol=0.5 / 255 + 1e-6)  # PNG holds 8 bits


@pytest.mark.slow
def test_compile_gives_the_same_images(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "cache"))  # the compiled step is kept there
    options = ("--seed", "5", "--num_images", "2", "--cond-scale", "2")
    assert generate(model_dir, tmp_path / "eager", *options, text="a cat") == 0
    assert generate(model_dir, tmp_path / "compiled", *options, "--compile", text="a cat") == 0
    eager, compiled = (read_images(tmp_path / name / "a-cat", 2) for name in ("eager", "compiled"))
    assert torch.equal(eager, compiled)


def test_run_directory_gentext_and_precision(model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "checkpoints" / "step-4")
    (run / "checkpoints" / "latest").write_text("step-4\n")
    code = generate(run, tmp_path / "out", "--seed", "1", "--gentxt", "--precision", "bf16", text="a red")
    assert code == 0
    caption = (tmp_path / "out" / "a-red" / "caption.txt").read_text()
    assert caption.startswith("a red") and len(caption) > len("a red\n")  # completed by the model
    read_images(tmp_path / "out" / "a-red")
    assert generate(model_dir, tmp_path / "blank", "--seed", "1", "--gentext", text="") == 0
    assert (tmp_path / "blank" / "prompt-0" / "grid.png").is_file()


def test_clip_ranks_the_images(model_dir, clip_dir, tmp_path):
    code = generate(model_dir, tmp_path / "out", "--seed", "2", "--clip_path", str(clip_dir), text="a dot")
    assert code == 0
    scores = json.loads((tmp_path / "out" / "a-dot" / "scores.json").read_text())
    ranked = [entry["score"] for entry in scores["best_first"]]
    assert scores["caption"] == "a dot" and ranked == sorted(ranked, reverse=True) and len(ranked) == 3
    assert [entry["file"] for entry in scores["best_first"]] == ["0.png", "1.png", "2.png"]
    clip = CLIP.from_pretrained(clip_dir).eval()  # the scores are CLIP's, of the images written
    images = read_images(tmp_path / "out" / "a-dot")
    text = ByteTokenizer().tokenize(["a dot"] * 3, TEXT_SEQ_LEN)
    with torch.no_grad():
        direct = clip(text, images)
    for entry in scores["best_first"]:
        assert entry["score"] == pytest.approx(float(direct[int(entry["file"][0])]), abs=0.05)
    unranked = tmp_path / "unranked"  # the same images without CLIP, in the order generated
    generate(model_dir, unranked, "--seed", "2", text="a dot")
    plain = read_images(unranked / "a-dot")
    assert sorted(plain.flatten(1).tolist()) == sorted(images.flatten(1).tolist())


def test_duplicate_prompts_get_their_own_folders(model_dir, tmp_path):
    assert generate(model_dir, tmp_path / "out", "--seed", "0", "--num-images", "1", text="A dog|a dog!") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-dog", "a-dog-2"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "a prompt far too long for sixteen"],
         "is 33 tokens long, more than the model's text_seq_len 16: shorten it or pass --truncate_captions"),
        (["--top_k", "1.5"], "--top_k 1.5: the threshold must be in [0, 1)"),
        (["--num_images", "0"], "must be at least 1"),
        (["--taming"], "was trained with VAE 'discrete', not 'vqgan'"),
        (["--tokenizer", "nope"], "unknown tokenizer 'nope'; available: bytes"),
        (["--hug"], "--hug reads a Hugging Face tokenizer JSON file"),
        (["--device", "nodevice"], "--device nodevice: not usable here"),
        (["--compile", "--precision", "bf16"], "--compile compiles the generation step for the CPU in fp32"),
    ],
)
def test_errors_are_one_line(model_dir, tmp_path, capsys, extra, message):
    assert generate(model_dir, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("dalle-train generate: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_incompatible_vae_and_truncation(model_dir, tmp_path, capsys):
    assert generate(tmp_path / "nothing", tmp_path / "out") == 2
    assert "nothing does not exist" in capsys.readouterr().err
    other = tmp_path / "other-vae"
    tiny_vae(num_tokens=64).save_pretrained(other)
    assert generate(model_dir, tmp_path / "out", "--vae-path", str(other)) == 2
    assert "cannot decode this model's codes" in capsys.readouterr().err
    same = tmp_path / "same-vae"
    tiny_vae().save_pretrained(same)
    long = "a prompt far too long for sixteen"
    assert generate(model_dir, tmp_path / "out", "--vae-path", str(same), "--truncate_captions",
                    "--num_images", "1", text=long) == 0
    assert (tmp_path / "out" / slug(long) / "0.png").is_file()


def test_without_seed_it_prints_the_seed_to_repeat(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "a", "--num_images", "1", text="x") == 0
    seed = capsys.readouterr().out.split("--seed ")[1].split(" ")[0]
    generate(model_dir, tmp_path / "b", "--num_images", "1", "--seed", seed, text="x")
    assert torch.equal(read_images(tmp_path / "a" / "x", 1), read_images(tmp_path / "b" / "x", 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generates_on_the_gpu_deterministically(model_dir, tmp_path, precision):
    for out in ("a", "b"):
        assert cli.main(["generate", "--dalle-path", str(model_dir), "--text", "a cat", "--num-images", "4",
                         "--outputs-dir", str(tmp_path / out), "--seed", "5", "--device", "cuda",
                         "--precision", precision]) == 0
    assert torch.equal(read_images(tmp_path / "a" / "a-cat", 4), read_images(tmp_path / "b" / "a-cat", 4))


def write_start_files(folder: Path) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """A 24 x 16 image (its centred 16 x 16 square is what the model takes) and a mask of the
    same size whose white pixels touch the bottom-right code cell; the expected tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(9))
    image_path, mask_path = folder / "start.png", folder / "mask.png"
    Image.frombytes("RGB", (24, 16), (pixels * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
                    .tobytes()).save(image_path)
    mask = Image.new("L", (24, 16))
    mask.paste(255, (4 + 13, 13, 4 + 16, 16))  # pixels 13..15 of the square: the last 4 px cell
    mask.save(mask_path)
    with Image.open(image_path) as image:
        expected = to_tensor(image.convert("RGB"))[:, :, 4:20][None]  # [1, 3, 16, 16]
    expected_mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    expected_mask[..., 13:, 13:] = True
    return image_path, mask_path, expected, expected_mask


def direct(model_dir: Path, prompt: str, seed: int, **kwargs) -> torch.Tensor:
    """What `generate_images` gives for ``--num_images 3 --batch_size 2`` and these keywords."""
    dalle = DALLE.from_pretrained(model_dir).eval()
    text = ByteTokenizer().tokenize([prompt], TEXT_SEQ_LEN)
    generator = torch.Generator().manual_seed(prompt_seed(seed, prompt))
    return torch.cat([
        dalle.generate_images(text.expand(n, -1), filter_thres=0.9, generator=generator, **kwargs)
        for n in (2, 1)
    ])


@pytest.mark.parametrize("count", [None, "5"])
def test_img_primes_as_generate_images_does(model_dir, tmp_path, count):
    image_path, _, expected, _ = write_start_files(tmp_path / "files")
    extra = ["--num-init-img-tokens", count] if count else []
    code = generate(model_dir, tmp_path / "out", "--seed", "1", "--img", str(image_path), *extra, text="dot")
    assert code == 0
    made = read_images(tmp_path / "out" / "dot")
    want = direct(model_dir, "dot", 1, img=expected, num_init_img_tokens=int(count) if count else None)
    assert torch.allclose(made, want, atol=0.5 / 255 + 1e-6)
    with Image.open(tmp_path / "out" / "dot" / "start.png") as start:
        assert torch.allclose(to_tensor(start.convert("RGB")), expected[0], atol=0.5 / 255 + 1e-6)


def test_mask_inpaints_as_generate_images_does_and_keeps_the_rest(model_dir, clip_dir, tmp_path):
    image_path, mask_path, expected, expected_mask = write_start_files(tmp_path / "files")
    assert generate(model_dir, tmp_path / "out", "--seed", "2", "--img", str(image_path), "--mask",
                    str(mask_path), "--temperature", "3", text="a dot") == 0
    made = read_images(tmp_path / "out" / "a-dot")
    want = direct(model_dir, "a dot", 2, img=expected, img_mask=expected_mask, temperature=3.0)
    assert torch.allclose(made, want, atol=0.5 / 255 + 1e-6)
    dalle = DALLE.from_pretrained(model_dir).eval()
    with torch.no_grad():
        own = dalle.vae.decode(dalle.image_codes(expected))  # [1, 3, 16, 16]: the kept part, reconstructed
    assert torch.allclose(made[..., :8, :8], own[..., :8, :8].expand(3, -1, -1, -1), atol=0.5 / 255 + 1e-6)
    assert not torch.allclose(made[..., 12:, 12:], own[..., 12:, 12:].expand(3, -1, -1, -1),
                              atol=0.5 / 255 + 1e-6)  # the masked cell was drawn anew
    ranked = tmp_path / "ranked"
    assert generate(model_dir, ranked, "--seed", "2", "--img", str(image_path), "--mask", str(mask_path),
                    "--temperature", "3", "--clip-path", str(clip_dir), text="a dot") == 0
    scores = json.loads((ranked / "a-dot" / "scores.json").read_text())
    assert [entry["score"] for entry in scores["best_first"]] == sorted(
        (entry["score"] for entry in scores["best_first"]), reverse=True)
    assert sorted(read_images(ranked / "a-dot").flatten(1).tolist()) == sorted(made.flatten(1).tolist())


def test_bad_start_images_and_masks_are_named(model_dir, tmp_path, capsys):
    image_path, mask_path, _, _ = write_start_files(tmp_path / "files")
    black = tmp_path / "files" / "black.png"
    Image.new("L", (24, 16)).save(black)
    small = tmp_path / "files" / "small.png"
    Image.new("L", (8, 8), 255).save(small)
    broken = tmp_path / "files" / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        (["--mask", str(mask_path)], "--mask need(s) --img, the image to start from"),
        (["--num-init-img-tokens", "3"], "--num_init_img_tokens need(s) --img"),
        (["--img", str(image_path), "--mask", str(mask_path), "--num-init-img-tokens", "3"],
         "--mask and --num_init_img_tokens both say which codes of --img are kept: give one"),
        (["--img", str(image_path), "--num-init-img-tokens", "16"],
         "--num_init_img_tokens 16: the model's images have 16 codes, so give 0 to 15"),
        (["--img", str(image_path), "--mask", str(small)],
         f"--mask {small} is 8x8 pixels but the --img file is 24x16: draw the mask over the image"),
        (["--img", str(image_path), "--mask", str(black)], f"--mask {black} is black everywhere"),
        (["--img", str(broken)], f"--img {broken}: not a readable image"),
        (["--img", str(tmp_path / "missing.png")], "--img"),
    ]
    for extra, message in cases:
        assert generate(model_dir, tmp_path / "out", *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("dalle-train generate: error: ") and message in err, (extra, err)
        assert not (tmp_path / "out").exists()
