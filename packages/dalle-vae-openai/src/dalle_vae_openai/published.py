"""Reading OpenAI's published ``encoder.pkl`` / ``decoder.pkl`` without pickle's code execution.

The files are whole ``dall_e`` modules saved with ``torch.save``: their pickles name the classes
``dall_e.encoder.Encoder``, ``dall_e.utils.Conv2d``, ... They are read with
``torch.load(weights_only=True)`` under an explicit allow-list that maps those names onto this
package's own classes (`dalle_vae_openai.networks`) and admits the few parameterless torch
layers they contain; any other global in a file is refused. The ``dall_e`` package itself is
never imported. The unpickled object only carries the architecture and the weights: a fresh
network is built from its configuration and the weights are copied in with a strict key check.

Files in PyTorch's zip format go through ``torch.load(weights_only=True)``. PyTorch's older
"legacy" format stores module classes as persistent ids, which ``weights_only`` refuses
outright, so for such files a restricted unpickler (`LegacyReader`) reads the same structure
with the same allow-list plus the tensor-rebuilding functions ``weights_only`` admits; it
never imports or calls anything else.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from torch import nn

from dalle_vae_openai.networks import Conv2d, Decoder, DecoderBlock, Encoder, EncoderBlock

#: the qualified names in the published pickles -> the classes they are read into
PUBLISHED_CLASSES: dict[str, type[nn.Module]] = {
    "dall_e.encoder.Encoder": Encoder,
    "dall_e.encoder.EncoderBlock": EncoderBlock,
    "dall_e.decoder.Decoder": Decoder,
    "dall_e.decoder.DecoderBlock": DecoderBlock,
    "dall_e.utils.Conv2d": Conv2d,
}

#: torch layers the published modules are made of (no parameters, nothing run on load)
TORCH_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ReLU, nn.Identity, nn.MaxPool2d, nn.Upsample,
)

Network = TypeVar("Network", Encoder, Decoder)


def allow_list() -> list:
    """The globals `load_published` admits, in `torch.serialization.safe_globals` form."""
    return [*((cls, name) for name, cls in PUBLISHED_CLASSES.items()), *TORCH_LAYERS]


def load_published(path: str | Path, kind: type[Network]) -> Network:
    """Read a published ``dall_e`` encoder or decoder file into a fresh `Encoder`/`Decoder`
    (``kind``) on the CPU, in fp32. Errors name the file and what it holds instead."""
    path = Path(path)
    label = "encoder" if kind is Encoder else "decoder"
    try:
        if zipfile.is_zipfile(path):
            with torch.serialization.safe_globals(allow_list()):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as handle:
                loaded = LegacyReader(handle).read()
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, struct.error) as error:
        raise ValueError(
            f"{path} is not a readable dall_e {label} file (OpenAI's published {label}.pkl "
            f"format, read with an allow-list of classes): {error}"
        ) from error
    if not isinstance(loaded, kind):
        other = "decoder" if kind is Encoder else "encoder"
        swapped = isinstance(loaded, (Encoder, Decoder))
        hint = f" (were the {label} and {other} files swapped?)" if swapped else ""
        raise ValueError(
            f"{path} holds a {type(loaded).__module__}.{type(loaded).__qualname__}, not a dall_e "
            f"{label} ({kind.__name__}){hint}"
        )
    return rebuild(loaded, path)


def rebuild(loaded: Network, path: Path) -> Network:
    """A freshly built network of ``loaded``'s configuration holding its weights (fp32,
    contiguous); a key or shape mismatch is an error naming ``path``."""
    kind = type(loaded)
    with torch.device("meta"):
        network = kind(**loaded.config())
    state = {name: tensor.detach().to(torch.float32).contiguous()
             for name, tensor in loaded.state_dict().items()}
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {path} do not fit a dall_e {kind.__name__} of configuration "
            f"{loaded.config()}: {error}"
        ) from error
    return network


# ----------------------------------------------------------------------------- legacy format

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: legacy storage class names (``torch.FloatStorage``, ``torch.cuda.HalfStorage``, ...) -> dtype
LEGACY_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class LegacyStorageType:
    """What a legacy storage class name resolves to: only its dtype (nothing callable)."""

    dtype: torch.dtype


def legacy_allowed_globals() -> dict[str, Any]:
    """Qualified name -> object, for `LegacyReader`: the classes of `allow_list` and the
    tensor plumbing that ``torch.load(weights_only=True)`` admits by default."""
    return {
        **PUBLISHED_CLASSES,
        **{f"{cls.__module__}.{cls.__qualname__}": cls for cls in TORCH_LAYERS},
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    }


class LegacyReader(pickle.Unpickler):
    """Reads a file of PyTorch's legacy ``torch.save`` format (magic number, protocol,
    system info, the object's pickle, storage keys, raw storage data) on the CPU, resolving
    globals only through `legacy_allowed_globals` and legacy storage names."""

    def __init__(self, file: IO[bytes]):
        super().__init__(file)
        self.file = file
        self.allowed = legacy_allowed_globals()
        self.storages: dict[str, torch.Tensor] = {}  # root key -> flat tensor owning the storage

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles' name
        if module in ("torch", "torch.cuda") and name in LEGACY_STORAGE_DTYPES:
            return LegacyStorageType(LEGACY_STORAGE_DTYPES[name])
        try:
            return self.allowed[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dall_e file") from None

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0].decode("ascii") if isinstance(pid, tuple) and isinstance(pid[0], bytes) else (
            pid[0] if isinstance(pid, tuple) and pid else None)
        if kind == "module":  # (class, source file, source): the class went through find_class
            return pid[1]
        if kind == "storage" and len(pid) == 6:
            storage_type, root_key, _location, numel, view_metadata = pid[1:]
            if not isinstance(storage_type, LegacyStorageType) or view_metadata is not None:
                raise pickle.UnpicklingError(
                    f"unsupported storage record {pid[:2]!r} (views are not supported)"
                )
            tensor = self.storages.get(root_key)
            if tensor is None:
                tensor = self.storages[root_key] = torch.empty(int(numel), dtype=storage_type.dtype)
            return torch.storage.TypedStorage(
                wrap_storage=tensor.untyped_storage(), dtype=storage_type.dtype, _internal=True
            )
        raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")

    def read(self) -> Any:
        """The saved object, its tensors filled from the data after the pickle (each `load`
        reads the next pickle of the file)."""
        if self.load() != LEGACY_MAGIC_NUMBER:
            raise ValueError("not a file written by torch.save (no legacy magic number, not a zip archive)")
        if (version := self.load()) != LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"unsupported legacy torch.save protocol {version!r}")
        if not self.load().get("little_endian", True):
            raise ValueError("the file was written on a big-endian machine; that is not supported")
        result = self.load()
        for key in self.load():
            tensor = self.storages[key]
            (numel,) = struct.unpack("<q", self.file.read(8))
            data = self.file.read(numel * tensor.element_size())
            if numel != tensor.numel() or len(data) != numel * tensor.element_size():
                raise ValueError(f"storage {key} holds {len(data)} bytes, expected {tensor.numel()} "
                                 f"elements of {tensor.dtype}: the file is truncated or damaged")
            tensor.copy_(torch.frombuffer(bytearray(data), dtype=tensor.dtype))
        return result
