from pathlib import Path

import pytest
import torch
from jsonargparse import CLI
from litgpt import GPT, Tokenizer
from litgpt.data import DataModule
from litgpt.lora import GPT as LoRAGPT
from litgpt.lora import Config as LoRAConfig
from litgpt.prompts import Alpaca, SmolLM2
from litgpt.utils import chunked_cross_entropy

import litgpt_plop.data as data_module
from litgpt_plop.data import (
    VAL_SEED_OFFSET,
    AccuracyResult,
    ReasoningGym,
    evaluate_accuracy,
    extract_answer,
    score_completion,
)

from helpers import SMOLLM2_VOCAB, load_gpt, tiny_config

TWO_TERMS = {"min_terms": 2, "max_terms": 2, "max_digits": 2}


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint: Path) -> Tokenizer:
    return Tokenizer(smollm2_checkpoint)


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint: Path) -> GPT:
    return load_gpt(smollm2_checkpoint)


def test_litgpt_cli_builds_the_data_module() -> None:
    def finetune(data: DataModule | None = None) -> DataModule | None:  # LitGPT's finetune signature
        return data

    data = CLI(
        finetune,
        args=[
            "--data", "litgpt_plop.data.ReasoningGym",
            "--data.task", "chain_sum",
            "--data.train_size", "30",
            "--data.prompt_style", "alpaca",
            "--data.task_config", '{"min_terms": 2, "max_terms": 3}',
        ],
    )  # fmt: skip
    assert isinstance(data, ReasoningGym)
    assert (data.task, data.train_size, data.task_config) == ("chain_sum", 30, {"min_terms": 2, "max_terms": 3})
    assert isinstance(data.prompt_style, Alpaca)
    assert len(data.items("train")) == 30


@pytest.mark.slow
def test_default_prompt_style_follows_the_model(tokenizer: Tokenizer) -> None:
    data = ReasoningGym()
    assert data.prompt_style is None
    data.connect(tokenizer=tokenizer)
    assert isinstance(data.prompt_style, SmolLM2)
    prompts = data.prompts("train")
    assert len(prompts) == data.train_size
    assert prompts[0].startswith("<|im_start|>system\n")
    assert prompts[0].endswith(
        f"<|im_start|>user\n{data.items('train')[0]['question']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_splits_are_deterministic_and_disjoint() -> None:
    # One-digit sums: few distinct questions, so plain seed ranges would share some.
    tiny_space = {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"], "allow_parentheses": False}
    data = ReasoningGym(task_config=tiny_space, train_size=200, val_size=20, seed=3)
    train, val = data.items("train"), data.items("val")
    assert (len(train), len(val)) == (200, 20)
    train_questions = {item["question"] for item in train}
    assert train_questions.isdisjoint(item["question"] for item in val)
    assert [item["answer"] for item in val] == [
        item["answer"] for item in ReasoningGym(task_config=tiny_space, train_size=5, val_size=20, seed=3).items("val")
    ]

    import reasoning_gym

    # The filter is what makes them disjoint here: the raw training seed range does repeat held-out questions.
    raw_train = reasoning_gym.create_dataset("basic_arithmetic", size=200, seed=3, **tiny_space)
    assert not train_questions.issuperset(item["question"] for item in raw_train)
    # And it is needed in general: seed s + 1 is seed s shifted by one item.
    shifted = reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=4)
    assert shifted[0]["question"] == reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=3)[1]["question"]
    assert VAL_SEED_OFFSET > 10 * data.train_size


@pytest.mark.slow
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_batches_fit_litgpt_training(tokenizer: Tokenizer, mask_prompt: bool) -> None:
    data = ReasoningGym(task_config=TWO_TERMS, train_size=16, val_size=8, mask_prompt=mask_prompt)
    data.connect(tokenizer=tokenizer, batch_size=4, max_seq_length=128)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.shape == labels.shape and input_ids.shape[0] == 4 and 30 < input_ids.shape[1] <= 128

    answers = {item["answer"] for item in data.items("train")}
    assistant_turn = tokenizer.processor.encode("<|im_start|>assistant\n").ids
    for row_ids, row_labels in zip(input_ids, labels):
        kept = row_labels != data.ignore_index
        # The prompt ends with the last "<|im_start|>assistant\n".
        n_prompt = int((row_ids == tokenizer.bos_id).nonzero()[-1]) + len(assistant_turn)
        assert row_ids[n_prompt - len(assistant_turn) : n_prompt].tolist() == assistant_turn
        if mask_prompt:
            assert not kept[:n_prompt].any()
            # What is learned: the answer followed by <|im_end|>, exactly one of the training answers.
            learned = row_labels[kept]
            assert learned[-1] == tokenizer.eos_id
            assert tokenizer.decode(learned[:-1]) in answers
        else:
            assert kept[:n_prompt].all() and torch.equal(row_labels[kept], row_ids[kept])
        assert torch.equal(row_labels[kept], row_ids[kept])

    val_batch = next(iter(data.val_dataloader()))
    assert val_batch["input_ids"].shape[0] == 4


@pytest.mark.slow
def test_training_loss_on_a_batch(tokenizer: Tokenizer, smollm2: GPT) -> None:
    data = ReasoningGym(task_config=TWO_TERMS, train_size=8, val_size=4)
    data.connect(tokenizer=tokenizer, batch_size=4, max_seq_length=128)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    input_ids, targets = batch["input_ids"], batch["labels"]

    # The same computation as LitGPT's `finetune_lora.fit`.
    with torch.no_grad():
        logits = smollm2(input_ids)
    loss = chunked_cross_entropy(logits[..., :-1, :], targets[..., 1:])
    assert torch.isfinite(loss)
    assert 0.1 < loss.item() < 8.0  # a trained model: well below a uniform guess, ln(49152) = 10.8

    # Gradients flow on a LoRA model, as in `finetune_lora`.
    torch.manual_seed(0)
    # LitGPT's default (Pythia-style) architecture, SmolLM2's vocabulary so that its token ids are valid inputs
    lora_config = tiny_config(n_layer=2, mlp="neox", vocab_size=SMOLLM2_VOCAB, block_size=256, config_class=LoRAConfig,
                              lora_r=4, lora_alpha=8, lora_query=True, lora_value=True)  # fmt: skip
    lora_model = LoRAGPT(lora_config)
    loss = chunked_cross_entropy(lora_model(input_ids)[..., :-1, :], targets[..., 1:])
    loss.backward()
    assert torch.isfinite(loss) and 10.0 < loss.item() < 12.0  # random init: about ln(49152)
    lora_grads = [p.grad for n, p in lora_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)


def test_scoring_of_fixed_completions() -> None:
    data = ReasoningGym(val_size=3)
    item = data.items("val")[0]
    scorer = data.scorer()
    assert extract_answer(f"  {item['answer']}\n") == item["answer"]

    right = score_completion(f" {item['answer']}\n", item, scorer)
    assert right.score == 1.0 and right.answer == item["answer"] and right.reference == item["answer"]
    wrong = score_completion(str(int(item["answer"]) + 1), item, scorer)
    assert wrong.score == 0.0
    chatty = score_completion(f"The answer is {item['answer']}.", item, scorer)
    assert 0.0 < chatty.score < 1.0  # reasoning-gym's partial credit, not counted as accurate


@pytest.mark.slow
def test_accuracy_aggregates_scores(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ReasoningGym(task_config=TWO_TERMS, val_size=4)
    items = data.items("val")
    completions = iter([items[0]["answer"], "wrong", f"It is {items[2]['answer']}", f" {items[3]['answer']} "])
    monkeypatch.setattr(data_module, "generate_completion", lambda *args, **kwargs: next(completions))

    # LitGPT's default (Pythia-style) architecture, SmolLM2's vocabulary so that its token ids are valid inputs
    model = GPT(tiny_config(n_layer=2, mlp="neox", vocab_size=SMOLLM2_VOCAB, block_size=256))
    model.max_seq_length = 16  # shorter than prompt + answer: must be extended, then restored
    model.train()
    result = evaluate_accuracy(model, tokenizer, items, data.scorer(), "smollm2", max_new_tokens=8)
    assert isinstance(result, AccuracyResult)
    assert result.accuracy == 0.5
    assert [record.score == 1.0 for record in result.records] == [True, False, False, True]
    assert 0.5 < result.mean_score < 0.75
    # The model is handed back as it came.
    assert model.training and model.max_seq_length == 16 and model.mask_cache is None
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


@pytest.mark.slow
def test_real_generation_smoke(smollm2_checkpoint: Path, tokenizer: Tokenizer, smollm2: GPT) -> None:
    data = ReasoningGym(task_config=TWO_TERMS, val_size=3)
    data.connect(tokenizer=tokenizer)
    items = data.items("val")
    smollm2.eval()
    first = evaluate_accuracy(smollm2, tokenizer, items, data.scorer(), data.prompt_style, max_new_tokens=6)
    assert 0.0 <= first.accuracy <= 1.0 and 0.0 <= first.mean_score <= 1.0
    assert [record.question for record in first.records] == [item["question"] for item in items]
    assert all(record.completion.strip() for record in first.records)  # it answered something
    assert all("<|im_end|>" not in record.completion for record in first.records)
    # Greedy decoding is deterministic, also on a LoRA model (whose LoRA weights start at zero: same answers).
    lora_config = LoRAConfig.from_file(
        smollm2_checkpoint / "model_config.yaml", lora_r=2, lora_alpha=4, lora_query=True, lora_value=True
    )
    lora_model = LoRAGPT(lora_config)
    lora_model.load_state_dict(smollm2.state_dict(), strict=False)
    second = evaluate_accuracy(lora_model, tokenizer, items, "basic_arithmetic", "smollm2", max_new_tokens=6)
    assert [r.completion for r in second.records] == [r.completion for r in first.records]
    assert second.accuracy == first.accuracy


@pytest.mark.slow
def test_batched_answers_match_one_by_one(tokenizer: Tokenizer, smollm2: GPT) -> None:
    # Questions of several token lengths, so batches are split by length and by size (5 per batch).
    data = ReasoningGym(task="spell_backward", task_config={"min_word_len": 3, "max_word_len": 8}, val_size=12)
    items = data.items("val")
    lengths = {len(tokenizer.encode(item["question"])) for item in items}
    assert len(lengths) > 1
    smollm2.eval()
    one_by_one = evaluate_accuracy(smollm2, tokenizer, items, data.scorer(), "smollm2", max_new_tokens=8)
    batched = evaluate_accuracy(smollm2, tokenizer, items, data.scorer(), "smollm2", max_new_tokens=8, batch_size=5)
    assert [r.completion for r in batched.records] == [r.completion for r in one_by_one.records]
    assert [r.question for r in batched.records] == [item["question"] for item in items]  # input order kept
    assert batched.mean_score == one_by_one.mean_score
    assert all(block.attn.kv_cache is None for block in smollm2.transformer.h)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_accuracy(smollm2, tokenizer, items, data.scorer(), "smollm2", batch_size=0)
