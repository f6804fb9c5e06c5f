"""Converting checkpoints of the upstream project (lucidrains' DALLE-pytorch) into this
project's model directories (``dalle-train convert PATH OUT``).

- `upstream`: reading and checking a ``vae.pt`` / ``dalle.pt`` (``torch.load(weights_only=True)``);
- `deepspeed_dir`: consolidating a DeepSpeed checkpoint directory of upstream's scripts;
- `mapping`: upstream DALLE hyperparameters and state-dict keys -> this project's;
- `vaes`: the checkpoint's VAE as one of this project's (DiscreteVAE, ``openai``, ``vqgan``);
- `pipeline`: the conversion itself, written atomically.
"""

from dalle_train.convert.pipeline import convert, read_upstream

__all__ = ["convert", "read_upstream"]
