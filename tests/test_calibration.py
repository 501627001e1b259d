"""The calibration pass on tiny LitGPT models: padding, determinism, data parallel, 4-bit, data, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from litgpt import GPT, Config
from litgpt.lora import GPT as LoRAGPT
from litgpt.lora import Config as LoRAConfig
from litgpt.tokenizer import Tokenizer

from litgpt_plop.args import CalibrationArgs, CkaArgs, PlopArgs
from litgpt_plop.scoring.calibration import Batch, as_batch, calibrate, make_batches, run_calibration
from litgpt_plop.scoring.prompts import (
    calibration_token_ids,
    data_module_prompts,
    read_prompts,
    select_samples,
    tokenize_prompts,
)
from litgpt_plop.selection.placement import model_kinds
from litgpt_plop.scoring.cka import CkaScorer
from litgpt_plop.scoring.hsic import unbiased_hsic
from litgpt_plop.scoring.plop import PlopScorer
from litgpt_plop.decide import plan_placement

from helpers import SCORING_MODEL, random_gpt, tiny_config

QUIET = CalibrationArgs(progress=False)


def neox_config() -> Config:
    """Pythia-style (biases, parallel residual, LayerNorm, partial rotary, GptNeoxMLP) at the same width, 2 layers,
    with a 128-wide MLP."""
    return tiny_config(n_layer=2, mlp="neox", **{**SCORING_MODEL, "intermediate_size": 128})


def tiny_gpt(config: Config | None = None) -> GPT:
    """``config``'s model, by default the LLaMA-style one of 3 layers; random weights, seed 0."""
    return random_gpt(config or tiny_config(n_layer=3, **SCORING_MODEL))


def prompts(n: int = 10, seed: int = 0, low: int = 5, high: int = 30) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=generator)
    return [torch.randint(0, 100, (int(length),), generator=generator) for length in lengths]


def all_scorers(gpt: GPT, denominator: str = "closed_form") -> list:
    layers = range(gpt.config.n_layer)
    return [
        PlopScorer(gpt, model_kinds(gpt.config), layers, denominator=denominator, mc_samples=256),
        CkaScorer(gpt, layers, pooling="last"),
        CkaScorer(gpt, layers, pooling="tokens"),
    ]


def results(scorers: list) -> tuple:
    plop, last, tokens = (s.result() for s in scorers)
    return plop.per_site, last.per_layer, tokens.per_layer


def with_extra_padding(batch: Batch, extra: int, seed: int = 0) -> Batch:
    """The same batch with ``extra`` more pad columns, every pad position holding a random (valid) token id."""
    B, T = batch.input_ids.shape
    mask = torch.cat([batch.mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    garbage = torch.randint(0, 100, (B, T + extra), generator=torch.Generator().manual_seed(seed))
    input_ids = torch.where(mask, torch.cat([batch.input_ids, garbage[:, T:]], dim=1), garbage)
    return as_batch(input_ids, mask, batch.index)


# ---- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [tiny_config(n_layer=3, **SCORING_MODEL), neox_config()], ids=["llama", "neox"])
def test_padded_and_unpadded_batches_give_identical_scores(config):
    gpt = tiny_gpt(config)
    # equal-length prompts: a batch with no padding at all, and the same batch with 9 pad columns
    same_length, _ = make_batches(prompts(8, low=12, high=13), batch_size=4, max_seq_length=64)
    assert all(b.mask.all() for b in same_length)
    # ragged prompts: padded to the longest in each batch, and with 9 more pad columns
    ragged, _ = make_batches(prompts(8, seed=1), batch_size=4, max_seq_length=64)
    for batches in (same_length, ragged):
        plain, padded = all_scorers(gpt), all_scorers(gpt)
        calibrate(gpt, batches, plain, progress=False)
        calibrate(gpt, [with_extra_padding(b, 9, seed=b.index) for b in batches], padded, progress=False)
        assert results(plain) == results(padded)  # bit-identical


def test_lengths_or_mask_describe_the_same_batch():
    input_ids = torch.randint(0, 100, (2, 6))
    by_lengths = as_batch(input_ids, torch.tensor([6, 3]))
    by_mask = as_batch(input_ids, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]))
    assert torch.equal(by_lengths.mask, by_mask.mask)
    with pytest.raises(ValueError, match="right padding"):
        as_batch(input_ids, torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]))


# ---- determinism and data parallel ------------------------------------------------------------------------


def test_same_seed_gives_identical_placements():
    gpt = tiny_gpt()
    data = prompts(30)
    calibration = CalibrationArgs(num_samples=12, batch_size=4, seed=7, progress=False)  # a seeded subset
    plop = PlopArgs(denominator="monte_carlo", mc_samples=256)
    first = plan_placement(gpt, data, "plop+cka", plop=plop, calibration=calibration)
    second = plan_placement(gpt, data, "plop+cka", plop=plop, calibration=calibration)
    assert first.sites == second.sites
    assert first.scores == second.scores
    assert first.calibration["samples"] == 12
    other = plan_placement(gpt, data, "plop+cka", plop=plop, calibration=CalibrationArgs(num_samples=12, batch_size=4, seed=8, progress=False))
    assert other.scores != first.scores  # the seed does pick the subset


def _data_parallel_worker(rank: int, world_size: int, tmp: str) -> None:
    torch.set_num_threads(1)  # two processes on a small CPU
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        gpt = tiny_gpt()
        batches, _ = make_batches(prompts(20), batch_size=4, max_seq_length=64)
        scorers = all_scorers(gpt, denominator="monte_carlo")
        # each rank runs its own shard of the batches: rank 0 gets batches 0, 2, 4; rank 1 gets 1, 3
        stats = calibrate(gpt, batches[rank::world_size], scorers, progress=False)
        placement = plan_placement(gpt, prompts(20), "plop+cka", calibration=CalibrationArgs(batch_size=4, progress=False))
        result = {
            "scores": results(scorers),
            "stats": [stats.samples, stats.tokens, stats.batches],
            "sites": [list(s.__dict__.values()) for s in placement.sites],
            "placement_scores": placement.scores.to_dict(),
        }
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_ranks_agree_with_one_process_over_the_union(tmp_path):
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1  # every rank ends with exactly the same scores and placement

    gpt = tiny_gpt()
    batches, _ = make_batches(prompts(20), batch_size=4, max_seq_length=64)
    scorers = all_scorers(gpt, denominator="monte_carlo")
    stats = calibrate(gpt, batches, scorers, progress=False)
    single = json.loads(json.dumps(results(scorers)))
    assert rank0["stats"] == [stats.samples, stats.tokens, stats.batches] == [20, stats.tokens, 5]
    for distributed_part, single_part in zip(rank0["scores"], single):
        assert distributed_part.keys() == single_part.keys()
        for key in single_part:
            assert distributed_part[key] == pytest.approx(single_part[key], rel=1e-6, abs=1e-9)
    placement = plan_placement(gpt, prompts(20), "plop+cka", calibration=CalibrationArgs(batch_size=4, progress=False))
    assert rank0["sites"] == [list(s.__dict__.values()) for s in placement.sites]


# ---- models: LoRA, 4-bit ----------------------------------------------------------------------------------


def test_lora_model_is_scored_on_its_base_linears():
    gpt = tiny_gpt()
    torch.manual_seed(1)
    lora_config = tiny_config(n_layer=3, **SCORING_MODEL, config_class=LoRAConfig, lora_r=4, lora_query=True,
                              lora_value=True, lora_mlp=True)  # fmt: skip
    lora = LoRAGPT(lora_config)
    lora.load_state_dict(gpt.state_dict(), strict=False)  # B = 0: the same function as the base model
    lora.train()
    batches, _ = make_batches(prompts(8), batch_size=4, max_seq_length=64)
    base_scores, lora_scores = all_scorers(gpt), all_scorers(lora)
    calibrate(gpt, batches, base_scores, progress=False)
    calibrate(lora, batches, lora_scores, progress=False)
    for base, adapted in zip(results(base_scores), results(lora_scores)):
        assert adapted == pytest.approx(base, rel=1e-5)
    assert lora.training and lora.transformer.h[0].attn.qkv.training  # modes restored


def quantize_blocks(gpt: GPT) -> GPT:
    """Swap every linear inside the blocks for a CPU-quantized NF4 ``Linear4bit``."""
    import bitsandbytes as bnb

    for block in gpt.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None, quant_type="nf4",
                        compute_dtype=torch.float32,
                    )  # fmt: skip
                    quantized.load_state_dict(child.state_dict())
                    setattr(parent, name, quantized.to("cpu"))
    return gpt


def test_4bit_model_is_guarded_and_scored_from_dequantized_weights():
    import bitsandbytes as bnb

    quantized = quantize_blocks(tiny_gpt())
    dense = tiny_gpt()
    for block, dense_block in zip(quantized.transformer.h, dense.transformer.h):
        for parent, dense_parent in ((block.attn, dense_block.attn), (block.mlp, dense_block.mlp)):
            for name, child in parent.named_children():
                if isinstance(child, bnb.nn.Linear4bit):
                    weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                    getattr(dense_parent, name).weight.data.copy_(weight)
    linears = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in linears:  # pretend this CPU has avx512_bf16: an unguarded eval forward would repack the weights
        module.support_avx512bf16_for_cpu = True
    quantized.eval()

    batches, _ = make_batches(prompts(8), batch_size=4, max_seq_length=64)
    quantized_scores, dense_scores = all_scorers(quantized), all_scorers(dense)
    calibrate(quantized, batches, quantized_scores, progress=False)
    calibrate(dense, batches, dense_scores, progress=False)

    for module in linears:
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        assert module.support_avx512bf16_for_cpu is True  # restored
    assert not quantized.training
    for got, expected in zip(results(quantized_scores), results(dense_scores)):
        assert got == pytest.approx(expected, rel=1e-4)


# ---- CKA on a model ---------------------------------------------------------------------------------------


def test_prompts_ending_with_the_same_token_flag_layer_0_as_degenerate():
    gpt = tiny_gpt()
    data = [torch.cat([p, torch.tensor([7])]) for p in prompts(12)]  # every prompt ends with token 7
    scorer = CkaScorer(gpt, range(3), pooling="last")
    run_calibration(gpt, data, [scorer], QUIET)
    with pytest.warns(UserWarning, match=r"degenerate on layer\(s\) \[0\]"):
        scores = scorer.result()
    assert scores.degenerate_layers == [0]
    with pytest.warns(UserWarning):
        placement = plan_placement(gpt, data, "cka", cka=CkaArgs(ratio=0.5), calibration=QUIET)
    assert 0 not in placement.layers and placement.scores.degenerate_layers == [0]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="degenerate"):
        plan_placement(gpt, data, "cka", cka=CkaArgs(ratio=1.0), calibration=QUIET)


def test_streaming_token_cka_is_close_to_the_one_shot_estimate():
    gpt = tiny_gpt(tiny_config(n_layer=2, **SCORING_MODEL))
    captured = {0: ([], []), 1: ([], [])}

    def capture(layer: int):
        def hook(module, args, output) -> None:
            captured[layer][0].append(args[0].detach())
            captured[layer][1].append(output.detach())

        return hook

    handles = [gpt.transformer.h[i].register_forward_hook(capture(i)) for i in (0, 1)]
    batches, _ = make_batches(prompts(40, low=20, high=40), batch_size=4, max_seq_length=64)
    scorer = CkaScorer(gpt, [0, 1], pooling="tokens")
    calibrate(gpt, batches, [scorer], progress=False)
    for h in handles:
        h.remove()
    scores = scorer.result()
    for layer in (0, 1):
        x = torch.cat([xs[b.mask] for xs, b in zip(captured[layer][0], batches)]).double()
        y = torch.cat([ys[b.mask] for ys, b in zip(captured[layer][1], batches)]).double()
        one_shot = float(unbiased_hsic(x, y) / torch.sqrt(unbiased_hsic(x, x) * unbiased_hsic(y, y)))
        assert scores.per_layer[layer] == pytest.approx(one_shot, abs=0.02)
    assert scores.samples == int(sum(b.mask.sum() for b in batches))


# ---- errors -----------------------------------------------------------------------------------------------


def test_bad_calibration_data_is_refused():
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match="Calibration data is empty"):
        plan_placement(gpt, [], "plop", calibration=QUIET)
    with pytest.raises(ValueError, match="Calibration prompt 1 is empty"):
        plan_placement(gpt, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], "plop", calibration=QUIET)
    padding_only = Batch(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool), index=3)
    with pytest.raises(ValueError, match="batch 3 is all padding"):
        calibrate(gpt, [padding_only], all_scorers(gpt), progress=False)
    with pytest.raises(ValueError, match="all padding"):
        as_batch(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 0]))


def test_nan_activations_are_refused_and_hooks_are_removed():
    gpt = tiny_gpt()
    gpt.train()
    with torch.no_grad():
        gpt.transformer.h[1].attn.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Non-finite activations .* batch 0"):
        plan_placement(gpt, prompts(4), "plop", calibration=QUIET)
    with pytest.raises(ValueError, match=r"Non-finite activations .* block 1 "):
        plan_placement(gpt, prompts(4), "cka", calibration=QUIET)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in gpt.modules())
    assert all(m.training for m in gpt.modules())


def test_long_prompts_are_truncated_with_a_warning():
    gpt = tiny_gpt()
    data = prompts(6) + [torch.randint(0, 100, (90,))]
    with pytest.warns(UserWarning, match="1 of 7 calibration prompts .* truncated"):
        placement = plan_placement(gpt, data, "plop", calibration=CalibrationArgs(max_seq_length=40, progress=False))
    assert placement.calibration["truncated"] == 1
    assert placement.calibration["tokens"] == sum(min(len(p), 40) for p in data)


# ---- prompts from files, tokenizers and data modules ------------------------------------------------------


@pytest.fixture
def tokenizer(tmp_path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = "<unk> <s> below is an instruction that describes a task write response appropriately completes the request".split()
    words += "### instruction: response: input: paired with provides further context . , : add two and three four five answer".split()
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    hf = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = Whitespace()
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}))
    return Tokenizer(folder)


def test_read_prompts_from_txt_jsonl_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("add two and three\n\n  \nadd four and five\n")
    assert read_prompts(tmp_path / "p.txt") == [{"instruction": "add two and three"}, {"instruction": "add four and five"}]
    (tmp_path / "p.jsonl").write_text('{"text": "add two"}\n\n{"instruction": "add", "input": "four and five", "output": "x"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == [{"instruction": "add two"}, {"instruction": "add", "input": "four and five"}]
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "add three"}]))
    assert read_prompts(tmp_path / "p.json") == [{"instruction": "add three"}]


def test_bad_prompt_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'.*missing\.txt' does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl', record 2: expected .* 'text' or 'instruction'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"use a \.txt"):
        read_prompts(tmp_path / "p.csv")


def test_tokenize_prompts_with_and_without_a_prompt_style(tokenizer):
    plain = tokenize_prompts(["add two and three"], tokenizer)
    assert plain[0].tolist() == tokenizer.encode("add two and three").tolist()
    styled = tokenize_prompts([{"instruction": "add two and three"}], tokenizer, "alpaca")
    assert len(styled[0]) > len(plain[0])
    assert styled[0].dtype == torch.long


def test_prompts_from_a_data_module_leave_out_the_response(tmp_path, tokenizer):
    from litgpt.data import JSON
    from litgpt.prompts import Alpaca

    examples = [{"instruction": f"add {a} and {b}", "input": "", "output": "answer five five five"} for a, b in [("two", "three")] * 10]
    examples += [{"instruction": "add four", "input": "and five", "output": "answer five five five"}] * 10
    (tmp_path / "data.json").write_text(json.dumps(examples))
    data_module = JSON(tmp_path / "data.json", val_split_fraction=0.2, num_workers=0)  # train set is a torch Subset
    data_module.connect(tokenizer, batch_size=4, max_seq_length=32)  # as training would
    token_ids = data_module_prompts(data_module, tokenizer, num_samples=5, seed=1)
    assert (data_module.batch_size, data_module.max_seq_length) == (4, 32)  # left as training set it
    assert len(token_ids) == 5
    expected = {tuple(t.tolist()) for t in tokenize_prompts(examples, tokenizer, Alpaca())}
    assert all(tuple(t.tolist()) in expected for t in token_ids)  # the prompt exactly as SFTDataset builds it
    answer = tokenizer.encode("answer").item()
    assert all(answer not in t.tolist() for t in token_ids)  # no response
    assert [t.tolist() for t in token_ids] == [t.tolist() for t in data_module_prompts(data_module, tokenizer, 5, seed=1)]

    file_args = CalibrationArgs(file=tmp_path / "p.txt", num_samples=2, prompt_style="alpaca")
    (tmp_path / "p.txt").write_text("add two\nadd three\nadd four\n")
    assert len(calibration_token_ids(file_args, tokenizer)) == 2
    assert len(calibration_token_ids(CalibrationArgs(num_samples=3), tokenizer, data_module)) == 3
    with pytest.raises(ValueError, match="No calibration data"):
        calibration_token_ids(CalibrationArgs(), tokenizer)


def test_select_samples_is_seeded_and_keeps_order():
    items = list(range(100))
    first = select_samples(items, 10, seed=3)
    assert first == select_samples(items, 10, seed=3) == sorted(first)
    assert first != select_samples(items, 10, seed=4)
    assert select_samples(items[:5], 10, seed=3) == items[:5]
