"""``dalle-train convert`` on checkpoint directories written by the real DeepSpeed engine as the
upstream project's ``train_vae.py --deepspeed`` wrote them: ``deepspeed.initialize`` on its
DiscreteVAE (whose keys and keywords this project's DiscreteVAE shares) with a torch optimizer,
a few steps, then ``engine.save_checkpoint(cp_dir, client_state={"hparams": ...})``.

dalle-train's own convert tests build such directories with ``torch.save`` from DeepSpeed's file
layout; here DeepSpeed writes them, so the reader is checked against what the library really
saves (its file names, keys and the objects in them, loaded with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import needs_deepspeed

from dalle_core import DiscreteVAE
from dalle_dist_deepspeed import DeepSpeedBackend
from dalle_train.cli import main

pytestmark = needs_deepspeed

#: upstream train_vae.py's vae_params, small
VAE_PARAMS = {
    "image_size": 16,
    "num_layers": 2,
    "num_tokens": 32,
    "codebook_dim": 16,
    "hidden_dim": 8,
    "num_resnet_blocks": 1,
}


@pytest.fixture
def distributed(world_of_one):
    """torch.distributed started as the deepspeed backend starts it, for one process."""
    backend = DeepSpeedBackend(zero_stage=1)  # the stage of the engine built below is its own
    backend.initialize()
    yield
    backend.shutdown()


def train_and_save(directory: Path, stage: int, steps: int = 2) -> DiscreteVAE:
    """Upstream's train_vae.py DeepSpeed branch in small: -> the trained VAE (its whole weights)."""
    import deepspeed

    torch.manual_seed(0)
    vae = DiscreteVAE(**VAE_PARAMS)
    config = {"train_batch_size": 2, "gradient_clipping": 0.5, "zero_optimization": {"stage": stage}}
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=vae, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.rand(2, 3, 16, 16, generator=generator)  # [B, C, H, W]
        loss = engine(images, return_loss=True)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(directory), client_state={"hparams": VAE_PARAMS})
    return vae


@pytest.mark.parametrize("stage", [0, 2])
def test_a_real_deepspeed_directory_converts_to_the_trained_vae(
    stage: int, distributed, tmp_path: Path
) -> None:
    trained = train_and_save(tmp_path / "vae-ds-cp", stage)
    assert (tmp_path / "vae-ds-cp" / "latest").read_text().strip() == "global_step2"
    assert main(["convert", str(tmp_path / "vae-ds-cp"), str(tmp_path / "out")]) == 0
    ours = DiscreteVAE.from_pretrained(tmp_path / "out")
    expected = trained.state_dict()
    assert ours.state_dict().keys() == expected.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key
    initial = DiscreteVAE(**VAE_PARAMS)  # trained weights, not the ones it started from
    assert not torch.equal(ours.state_dict()["codebook.weight"], initial.state_dict()["codebook.weight"])
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours.get_codebook_indices(images), trained.get_codebook_indices(images))


def test_a_real_zero3_directory_is_refused_naming_zero_to_fp32(
    distributed, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train_and_save(tmp_path / "vae-ds-cp", stage=3, steps=1)
    assert main(["convert", str(tmp_path / "vae-ds-cp"), str(tmp_path / "out")]) == 2
    assert "zero_to_fp32.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
