"""The DeepSpeed configuration built from the trainer's plan and merged with ``--deepspeed-config``
(no deepspeed needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dalle_core.interfaces import StepPlan
from dalle_dist_deepspeed.config import (
    DeepSpeedConfigError,
    build_config,
    offloads_optimizer,
    read_config_file,
    resolve_zero_stage,
)

PLAN = StepPlan(micro_batch_size=2, ga_steps=3, clip_grad_norm=0.5, precision="fp32")


def test_the_plan_sets_batches_accumulation_clipping_and_the_stage():
    config = build_config(PLAN, world_size=4, zero_stage=2)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2}
    assert config["torch_autocast"] == {"enabled": False}
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert "zero_force_ds_cpu_optimizer" not in config and not offloads_optimizer(config)
    assert config["zero_allow_untested_optimizer"] is True  # any torch optimizer the trainer builds


def test_no_clipping_is_zero_and_the_default_stage_is_one():
    config = build_config(StepPlan(micro_batch_size=1), world_size=1)
    assert config["gradient_clipping"] == 0.0
    assert config["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_16_bit_precision_is_torch_autocast_never_deepspeeds_cast(precision, dtype):
    config = build_config(StepPlan(micro_batch_size=1, precision=precision), world_size=2)
    assert config["torch_autocast"] == {"enabled": True, "dtype": dtype}
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False


def test_offload_moves_the_optimizer_to_the_cpu_and_keeps_the_trainers_optimizer():
    config = build_config(PLAN, world_size=2, zero_stage=3, offload=True)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert offloads_optimizer(config)


def test_keys_only_in_the_file_are_kept_and_repeating_a_flag_is_fine():
    file = {
        "zero_optimization": {"reduce_bucket_size": 5e5, "stage": 2},
        "gradient_accumulation_steps": 3,
        "activation_checkpointing": {"partition_activations": True},
        "torch_autocast": {"dtype": "bf16"},
    }
    config = build_config(
        StepPlan(micro_batch_size=2, ga_steps=3, precision="bf16"), 2, zero_stage=2, file_config=file
    )
    assert config["zero_optimization"] == {"reduce_bucket_size": 5e5, "stage": 2}
    assert config["activation_checkpointing"] == {"partition_activations": True}
    assert config["torch_autocast"] == {"dtype": "bfloat16", "enabled": True}  # an alias is no conflict
    assert file["zero_optimization"] == {
        "reduce_bucket_size": 5e5,
        "stage": 2,
    }  # the file's dict is untouched


def test_defaults_yield_to_the_file():
    config = build_config(PLAN, 1, file_config={"steps_per_print": 1, "zero_allow_untested_optimizer": False})
    assert config["steps_per_print"] == 1 and config["zero_allow_untested_optimizer"] is False


def test_without_the_flags_the_file_decides_stage_and_offload():
    file = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    config = build_config(PLAN, 2, zero_stage=None, offload=False, file_config=file)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert resolve_zero_stage(None, file) == 3 and resolve_zero_stage(1, {}) == 1


def test_every_conflict_is_listed_with_the_flag_that_decided_it():
    file = {
        "gradient_accumulation_steps": 4,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}},
        "bf16": {"enabled": True},
        "train_batch_size": 64,
    }
    with pytest.raises(DeepSpeedConfigError) as caught:
        build_config(PLAN, 2, zero_stage=1, offload=True, file_config=file)
    message = str(caught.value)
    assert message.startswith("--deepspeed-config contradicts the flags")
    for line in (
        '"gradient_accumulation_steps": file says 4, --ga-steps says 3',
        '"train_micro_batch_size_per_gpu": file says 8, --batch-size says 2',
        '"gradient_clipping": file says 1.0, --clip-grad-norm says 0.5',
        '"zero_optimization.stage": file says 3, --zero-stage says 1',
        '"zero_optimization.offload_optimizer.device": file says "nvme", --offload says "cpu"',
        '"bf16.enabled": file says true, --precision fp32 says false (it runs as DeepSpeed\'s torch_autocast',
        '"train_batch_size": file says 64, --batch-size 2 x --ga-steps 3 x 2 processes says 12',
    ):
        assert line in message, message


def test_a_16_bit_cast_in_the_file_conflicts_with_autocast():
    with pytest.raises(
        DeepSpeedConfigError, match='"fp16.enabled": file says true, --precision fp16 says false'
    ):
        build_config(
            StepPlan(micro_batch_size=1, precision="fp16"), 1, file_config={"fp16": {"enabled": True}}
        )
    with pytest.raises(
        DeepSpeedConfigError, match='"torch_autocast.dtype": file says "float16", --precision bf16'
    ):
        build_config(
            StepPlan(micro_batch_size=1, precision="bf16"),
            1,
            file_config={"torch_autocast": {"dtype": "float16"}},
        )


def test_the_file_may_not_build_the_optimizer_or_the_schedule():
    file = {"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(DeepSpeedConfigError) as caught:
        build_config(PLAN, 1, file_config=file)
    assert '"optimizer": the trainer builds AdamW' in str(caught.value)
    assert '"scheduler": the trainer sets the learning rate' in str(caught.value)


@pytest.mark.parametrize("stage", [0, 4, "2", True])
def test_a_stage_outside_1_to_3_is_refused(stage):
    with pytest.raises(DeepSpeedConfigError, match="is not one of 1, 2, 3"):
        resolve_zero_stage(stage, {})
    with pytest.raises(DeepSpeedConfigError, match='"zero_optimization.stage" of --deepspeed-config'):
        resolve_zero_stage(None, {"zero_optimization": {"stage": stage}})


def test_reading_the_file(tmp_path: Path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"steps_per_print": 5}))
    assert read_config_file(good) == {"steps_per_print": 5}
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, expected in (
        ("bad.json", "not valid JSON"),
        ("list.json", "expected a JSON object, got list"),
        ("missing.json", "cannot read it"),
    ):
        with pytest.raises(DeepSpeedConfigError, match=f"--deepspeed-config .*{name}: {expected}"):
            read_config_file(tmp_path / name)
