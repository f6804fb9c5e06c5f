"""What the demo measures beside its generated pictures (chance, the VAE's ceiling on held-out
pictures, the extra prompts) and the fields of its ``report.md``."""

from __future__ import annotations

import pytest
import torch

from dalle_core import DiscreteVAE
from dalle_train.data.shapes import PROMPTS, ShapesDataset, Spec, judge
from dalle_train.demo_report import (
    agreement,
    chance,
    extra_prompts,
    hard_reconstructions,
    held_out,
    report,
    rounded,
)


def test_chance_is_one_value_in_each_fields_choices() -> None:
    assert chance() == pytest.approx(
        {"colour": 1 / 5, "shape": 1 / 4, "position": 1 / 5, "size": 1 / 2, "all": 1 / 200})


def test_extra_prompts_are_distinct_new_and_follow_the_seed() -> None:
    drawn = extra_prompts(0, 6)
    assert extra_prompts(0, 6) == drawn and extra_prompts(0, 3) == drawn[:3]
    assert extra_prompts(1, 6) != drawn
    assert [s.caption() for s in extra_prompts(0, 2)] == [  # as measured in benchmarks/demo-quality.md
        "a small red square in the bottom right", "a large purple diamond in the bottom right"]
    many = extra_prompts(0, 150)  # of the grammar's 200, 6 fixed: draws repeat and hit fixed ones
    assert len(set(many)) == 150 and not set(many) & {Spec(*p) for p in PROMPTS}


def test_held_out_pictures_are_the_datasets_own_past_the_training_ones() -> None:
    specs, images = held_out(seed=3, start=40, count=5)
    dataset = ShapesDataset(45, seed=3)
    assert specs == [dataset.spec(i) for i in range(40, 45)]
    assert torch.equal(images, torch.stack([dataset[i].image for i in range(40, 45)]))


def test_the_checker_reads_held_out_pictures_right_and_a_wrong_picture_wrong() -> None:
    """The ceiling's yardstick: on the pictures themselves the checker agrees >= 95%; on the same
    pictures paired with shifted specs it agrees less on every field it can get wrong."""
    specs, images = held_out(seed=0, start=4000, count=200)
    right = agreement(specs, images)
    assert right["colour"] == 1.0 and right["all"] >= 0.95
    shifted = agreement(specs[1:] + specs[:1], images)
    assert all(shifted[field] < 0.7 for field in ("colour", "shape", "position", "all"))
    with pytest.raises(ValueError):  # a spec for every picture, no fewer
        agreement(specs[:3], images[:4])


def test_hard_reconstructions_decode_the_hard_codes_and_count_them() -> None:
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=32, num_tokens=16, codebook_dim=8, num_layers=2, hidden_dim=8).eval()
    _, images = held_out(seed=0, start=0, count=7)
    pictures, counts = hard_reconstructions(vae, images, batch_size=3)
    with torch.no_grad():
        codes = vae.get_codebook_indices(images)  # [7, 64]
        assert torch.allclose(pictures, vae.decode(codes).clamp(0, 1), atol=1e-6)  # batches of 3 vs 7
    assert torch.equal(counts, torch.bincount(codes.flatten(), minlength=16))
    assert counts.sum() == 7 * 64 and pictures.shape == images.shape


def test_the_ceiling_of_a_vae_that_cannot_reconstruct_is_near_nothing() -> None:
    """A VAE that never trained decodes every picture to much the same blur: the ceiling the
    demo reports for it is low, so a high one is earned."""
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=32, num_tokens=16, codebook_dim=8, num_layers=2, hidden_dim=8).eval()
    specs, images = held_out(seed=0, start=0, count=40)
    pictures, _ = hard_reconstructions(vae, images)
    assert agreement(specs, pictures)["all"] < 0.1
    assert [judge(p) for p in pictures[:1]] != [judge(i) for i in images[:1]]


def summary() -> dict:
    def scores(colour: float, shape: float) -> dict[str, float]:
        return {"colour": colour, "shape": shape, "position": 1.0, "size": 0.958, "all": 0.1}

    return {
        "seed": 2, "quick": False, "steps": {"vae": 1200, "dalle": 500, "clip": 300},
        "checker": {"generated": scores(0.979, 0.938), "images": 48, "extra": scores(0.97, 0.875),
                    "extra_images": 47, "vae_ceiling": scores(1.0, 0.872), "held_out": 500,
                    "dataset": scores(0.998, 0.978), "chance": rounded(chance())},
        "extra_prompts": ["a small red square in the bottom right", "a large blue circle in the center"],
        "vae": {"num_tokens": 128, "codes_used": 41, "codes_per_image": 64},
        "seconds": {"vae": 31.6, "dalle": 161.2, "clip": 26.8, "generate": 1.0, "judge": 2.5, "total": 223.1},
    }


REPORT = """\
# dalle-train demo, seed 2

The pixel checker reads colour, shape, position and size back from each picture; these are the
fractions of pictures where it agrees with the prompt.

| pictures | colour | shape | position | size | all four | count |
|---|---|---|---|---|---|---|
| generated for the fixed prompts | 98% | 94% | 100% | 96% | 10% | 48 |
| generated for prompts drawn with the seed | 97% | 88% | 100% | 96% | 10% | 47 |
| VAE ceiling: hard-code reconstructions of held-out pictures | 100% | 87% | 100% | 96% | 10% | 500 |
| the held-out pictures themselves (the checker's own accuracy) | 100% | 98% | 100% | 96% | 10% | 500 |
| chance: a uniform guess | 20% | 25% | 20% | 50% | 0.5% | - |

Prompts drawn with the seed: "a small red square in the bottom right"; "a large blue circle in the center".

| stage | seconds | steps |
|---|---|---|
| vae | 31.6 | 1200 |
| dalle | 161.2 | 500 |
| clip | 26.8 | 300 |
| generate | 1.0 | - |
| judge | 2.5 | - |
| total | 223.1 | - |

VAE codebook: 41 of 128 codes used on the 500 held-out pictures (87 dead); 64 codes per picture.
"""


def test_the_report_holds_every_figure_of_the_summary() -> None:
    """The whole text: each agreement in its row and column (under 10% with one decimal), each
    row's count, the drawn prompts, seconds and steps per stage, codebook usage."""
    assert report(summary()) == REPORT


def test_a_quick_run_says_so_in_the_title() -> None:
    assert report({**summary(), "quick": True}).startswith("# dalle-train demo, seed 2 (--quick)\n")


def test_the_summary_keeps_three_decimals() -> None:
    assert rounded({"colour": 0.12345, "shape": 0.9876}) == {"colour": 0.123, "shape": 0.988}
