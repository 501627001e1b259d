"""The final merge, streamed: ``lit_model.pth`` written one tensor at a time, equal to what ``litgpt merge_lora`` writes.

Stock ``litgpt merge_lora`` memory-maps the base checkpoint, assigns it and the adapter into a ``litgpt.lora.GPT``,
casts the whole model to the adapter's dtype, merges every LoRA layer in place and ``torch.save``s the state dict.
By the save it owns every merged weight (the in-place add on a private file mapping copies each adapted weight into
anonymous memory) and, where the base checkpoint's dtype is not the adapter's, a cast copy of every weight: the
final merge is then the largest thing a finetune holds (``benchmarks/merge_memory.py`` measures it).

``merge_streamed`` does the same steps on the same objects, in another order: the ``litgpt.lora.GPT`` is built on
the meta device and assigned the memory-mapped tensors as stock assigns them (so LitGPT's own key mapping applies),
and then each tensor of the state dict, in its order, is cast, merged by that layer's own ``LoRALinear.merge`` on a
fresh copy of the weight, written into the file and dropped before the next. The arithmetic is LitGPT's own code on
the same dtypes, so the tensors are bit-identical to stock's (tests/test_streamed_merge.py checks ``torch.equal``);
what it owns at a time is one merged weight and its ``B A`` update. Unadapted tensors in the adapter's dtype are
written straight from the file mapping, and once a tensor is written the base pages it was read from are handed
back (``MappedCheckpoint.release``), so the mapping does not fill the process's resident memory either.

The file is a standard ``torch.save`` zip archive written by PyTorch's own writer (``torch._C.PyTorchFileWriter``):
the pickle of the state dict first, which needs only each tensor's shape and dtype, then one record per tensor,
which ``torch.save`` would write from storages it holds all at once and this writes as each tensor is made. For
the same tensors the bytes are the same as ``torch.save``'s (also tested).
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from litgpt.lora import GPT, Config, LoRALinear, LoRAQKVLinear, lora_filter
from litgpt.scripts.merge_lora import load_lora_metadata

from litgpt_plop.memory import release_free_memory
from litgpt_plop.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, MappedCheckpoint

LORA_FILE = "lit_model.pth.lora"  # the stock adapter file


def merge_streamed(adapter_dir: Path, base_checkpoint_dir: Path) -> Path:
    """Write ``adapter_dir/lit_model.pth``: the base model of ``base_checkpoint_dir`` with the stock-layout adapter
    ``adapter_dir/lit_model.pth.lora`` merged, as ``litgpt merge_lora`` would (its ``hyperparameters.yaml`` flags,
    its ``model_config.yaml``, the adapter's dtype), one tensor at a time. Returns the file's path."""
    adapter_dir, base_checkpoint_dir = Path(adapter_dir), Path(base_checkpoint_dir)
    lora_params, _, _ = load_lora_metadata(adapter_dir)
    config = Config.from_file(adapter_dir / CONFIG_FILE, **lora_params)
    with torch.device("meta"):
        model = GPT(config)
    model.cos = model.sin = None  # as stock: not needed to merge
    checkpoint = MappedCheckpoint(base_checkpoint_dir / WEIGHTS_FILE)
    weights = dict(checkpoint.state_dict)
    adapter = torch.load(adapter_dir / LORA_FILE, mmap=True, weights_only=True)
    adapter = adapter.get("model", adapter)
    dtype = next(iter(adapter.values())).dtype  # stock's rule: the adapter's dtype is the merged model's
    weights.update(adapter)
    model.load_state_dict(weights, assign=True)
    del weights, adapter
    merging = {f"{name}.linear.weight": m for name, m in model.named_modules() if isinstance(m, LoRALinear) and _merges(m)}
    state = {key: value for key, value in model.state_dict().items() if not lora_filter(key, value)}

    written: list[torch.Tensor] = []  # the base tensor whose merged or cast copy is being written

    def tensors() -> Iterator[torch.Tensor]:
        for key, value in state.items():
            written.append(value)
            yield _merged(merging[key], dtype) if key in merging else _cast(value, dtype)

    def hand_back() -> None:
        """Once a tensor is written, the base pages it was made from leave the process (they were read through
        the mapping: without this, the merge of an 8B model ends with all 15 GiB of them resident)."""
        while written:
            checkpoint.release(written.pop())
        release_free_memory()

    specs = {key.replace("linear.", ""): (tuple(v.shape), _cast_dtype(v, dtype)) for key, v in state.items()}
    path = adapter_dir / WEIGHTS_FILE
    save_streamed(path, specs, tensors(), on_written=hand_back)
    return path


def _merges(module: LoRALinear) -> bool:
    """Whether ``LoRALinear.merge`` changes the module's weight (its own condition)."""
    if isinstance(module, LoRAQKVLinear):
        return module.r > 0 and any(module.enable_lora)
    return module.r > 0


def _cast_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``Module.to(dtype=...)`` makes of one tensor: floating point ones cast, others as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _merged(module: LoRALinear, dtype: torch.dtype) -> torch.Tensor:
    """The module's merged weight, by its own ``merge`` on a copy that this process owns (the base weight's file
    mapping is left untouched); the module is left as it was."""
    base = module.linear.weight
    weight = _cast(base.detach(), dtype)
    if weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
        weight = weight.clone()  # an in-place add would copy the mapped pages into memory that stays owned
    for name in ("lora_A", "lora_B"):
        factor = getattr(module, name)
        if factor.dtype != dtype:
            setattr(module, name, nn.Parameter(_cast(factor.detach(), dtype)))
    module.linear.weight = nn.Parameter(weight)
    module.merged = False
    module.merge()
    merged = module.linear.weight.detach()
    module.linear.weight, module.merged = base, False
    return merged


# ---- torch.save, one record at a time ----------------------------------------------------------------------


class _StorageRef:
    """The storage of the ``index``-th tensor, as the pickle names it (``torch.save``'s persistent id)."""

    def __init__(self, index: int, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = str(index), dtype, numel


class _TensorRef:
    """A contiguous CPU tensor of ``shape`` in its own storage, pickled as ``torch.Tensor.__reduce_ex__`` pickles one."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple:
        stride = torch.empty(self.shape, device="meta").stride()
        hooks: collections.OrderedDict = collections.OrderedDict()
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, hooks)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return "storage", storage_type, obj.key, "cpu", obj.numel
        return None


def save_streamed(
    path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: Iterator[torch.Tensor],
    on_written: Callable[[], None] = release_free_memory,
) -> None:
    """``torch.save`` of a flat dict of CPU tensors whose keys, shapes and dtypes are ``specs``, with the tensors
    themselves taken from ``tensors`` (in ``specs``' order) one at a time, each written and dropped before the next
    is taken. The records are ``torch.save``'s: the pickle, ``.format_version``, ``.storage_alignment``,
    ``byteorder``, then ``data/<i>`` for the i-th tensor. ``on_written`` runs after each tensor is dropped."""
    for shape, dtype in specs.values():
        if dtype in torch.storage._new_dtypes():
            raise ValueError(f"Cannot stream a {dtype} tensor: torch.save pickles it another way")
    refs = {key: _TensorRef(_StorageRef(i, dtype, _numel(shape)), shape) for i, (key, (shape, dtype)) in enumerate(specs.items())}
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(refs)  # torch.save's default protocol
    data = buffer.getvalue()
    alignment = str(torch.serialization._get_storage_alignment())
    with torch.serialization._open_zipfile_writer(str(path)) as zip_file:
        zip_file.write_record("data.pkl", data, len(data))
        zip_file.write_record(".format_version", "1", len("1"))
        zip_file.write_record(".storage_alignment", alignment, len(alignment))
        zip_file.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        # not zip(): its reused result tuple would hold the last tensor while the next one is made
        for i, (key, (shape, dtype)) in enumerate(specs.items()):
            tensor = next(tensors, None)
            if tensor is None:
                raise ValueError(f"{key}: no tensor for it")
            if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device.type != "cpu":
                raise ValueError(f"{key}: a {tensor.dtype} {tuple(tensor.shape)} tensor on {tensor.device}, expected {dtype} {shape} on cpu")
            storage = tensor.untyped_storage()
            if not tensor.is_contiguous() or tensor.storage_offset() != 0 or storage.nbytes() != tensor.nbytes:
                storage = tensor.clone(memory_format=torch.contiguous_format).untyped_storage()
            zip_file.write_record(f"data/{i}", storage, tensor.nbytes)
            del tensor, storage
            on_written()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
