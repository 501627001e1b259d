"""`PLoPCallback` in a real Lightning `Trainer`: placement before the optimizers, resume, DDP, bad input."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from litgpt import Config
from torch.utils.data import DataLoader

from litgpt_plop.model.adapt import current_placement
from litgpt_plop.args import CalibrationArgs
from litgpt_plop.callbacks import PLoPCallback, token_ids_from_batches
from litgpt_plop.selection.placement import PlacementError

from helpers import LitLLM, random_gpt, tiny_config, trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128


def model_config() -> Config:
    """LLaMA-style, 3 layers, 32 wide, 4 heads in 2 query groups, a 64-token context."""
    return tiny_config(n_layer=3, vocab_size=VOCAB, block_size=64)


def lit_module() -> LitLLM:
    """The model, AdamW at 3e-2."""
    return LitLLM(model_config(), lr=3e-2)


class TokenData(torch.utils.data.Dataset):
    """Sequences with a learnable pattern (an arithmetic progression modulo the vocabulary), right-padded."""

    def __init__(self, n: int = 16, length: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.input_ids = (starts + 3 * torch.arange(length)) % VOCAB
        self.mask = torch.ones_like(self.input_ids)
        self.mask[::2, length - 5 :] = 0  # every other row padded: calibration must mask it

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.mask[i]}


def loader(**kwargs) -> DataLoader:
    return DataLoader(TokenData(**kwargs), batch_size=4)


def test_fit_places_before_the_optimizer_and_trains(tmp_path):
    callback = PLoPCallback(method="plop", calibration=CalibrationArgs(num_samples=16, batch_size=4))
    module = lit_module()
    t = trainer(tmp_path, [callback], max_steps=12)
    t.fit(module, train_dataloaders=loader())

    placement = callback.placement
    assert placement is not None and placement.method == "plop" and len(placement.kinds) == 3
    assert callback.calibrated
    config = module.model.config
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == placement.trainable_params(config)
    assert all("lora_" in name for name in trainable)
    # the optimizer holds exactly the adapter parameters, no stale or missing ones
    optimizer_params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in trainable.values()}
    assert current_placement(module.model).sites == placement.sites
    assert module.losses[-1] < module.losses[0] - 0.3
    # the run shows what it chose: files in the log directory, scores in the logger
    log_dir = Path(t.log_dir)
    saved = json.loads((log_dir / "placement.json").read_text())
    assert [s["kind"] for s in saved["sites"]][:1] and saved["trainable_params"] == placement.trainable_params(config)
    assert (log_dir / "report.md").is_file() and (log_dir / "scores.png").is_file()
    (metrics,) = log_dir.glob("metrics.csv")
    assert "plop/trainable_params" in metrics.read_text().splitlines()[0]


def test_model_created_in_configure_model_is_placed_before_the_optimizer(tmp_path):
    class LateModel(LitLLM):
        def __init__(self) -> None:
            L.LightningModule.__init__(self)
            self.lr, self.losses, self.model = 1e-2, [], None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = random_gpt(model_config())

    callback = PLoPCallback(method="qv")
    module = LateModel()
    t = trainer(tmp_path, [callback], max_steps=2)
    t.fit(module, train_dataloaders=loader())
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert current_placement(module.model).kinds == ["query", "value"]


def test_resume_reapplies_the_placement_without_calibrating(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PLoPCallback(method="plop", calibration=CalibrationArgs(num_samples=16, batch_size=4))
    module = lit_module()
    trainer(tmp_path, [first, checkpoint], max_steps=4).fit(module, train_dataloaders=loader())
    ckpt_path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)

    resumed = PLoPCallback(method="plop", calibration=CalibrationArgs(num_samples=16, batch_size=4))
    fresh = lit_module()
    # same max_steps: Lightning restores everything and trains no further, so the weights are the checkpoint's
    trainer(tmp_path, [resumed], max_steps=4).fit(fresh, train_dataloaders=loader(seed=1), ckpt_path=ckpt_path)
    assert not resumed.calibrated
    assert resumed.placement.sites == first.placement.sites
    state = fresh.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert any(torch.count_nonzero(v) for k, v in state.items() if "lora_B" in k)  # trained adapters came back


class RecordPlacement(Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sites = [[s.layer, s.kind, s.rank] for s in current_placement(pl_module.model).sites]
        losses = pl_module.losses
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({"sites": sites, "losses": losses}))


def test_ddp_two_cpu_processes_apply_the_same_placement(tmp_path):
    callback = PLoPCallback(method="plop+cka", calibration=CalibrationArgs(num_samples=16, batch_size=2))
    t = trainer(tmp_path, [callback, RecordPlacement(tmp_path)], max_steps=3, strategy="ddp_spawn", devices=2)
    t.fit(lit_module(), train_dataloaders=loader())
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["sites"] and rank0["sites"] == rank1["sites"]
    assert len(rank0["losses"]) == len(rank1["losses"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="BitsandbytesPrecision needs a CUDA GPU")
def test_bitsandbytes_precision_calibrates_on_the_4bit_model(tmp_path):
    import bitsandbytes as bnb
    from lightning.pytorch.plugins import BitsandbytesPrecision

    callback = PLoPCallback(method="plop", calibration=CalibrationArgs(num_samples=16, batch_size=4))
    module = lit_module()
    t = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cuda",
        devices=1,
        max_steps=5,
        plugins=BitsandbytesPrecision("nf4", dtype=torch.bfloat16),
        callbacks=[callback],
        enable_progress_bar=False,
    )
    t.fit(module, train_dataloaders=loader())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == callback.placement.trainable_params(module.model.config)
    assert module.losses[-1] < module.losses[0]


def test_no_litgpt_model_is_a_clear_error(tmp_path):
    class NotLitGPT(LitLLM):
        def __init__(self) -> None:
            L.LightningModule.__init__(self)
            self.model, self.losses, self.lr = torch.nn.Linear(4, 4), [], 1e-2

    with pytest.raises(PlacementError, match="found no LitGPT GPT model in NotLitGPT"):
        trainer(tmp_path, [PLoPCallback()], max_steps=1).fit(NotLitGPT(), train_dataloaders=loader())


def test_empty_calibration_loader_is_a_clear_error(tmp_path):
    empty = DataLoader(TokenData(n=0), batch_size=4)
    with pytest.raises(ValueError, match="calibration data is empty"):
        t = trainer(tmp_path, [PLoPCallback(calibration_data=empty)], max_steps=1)
        t.fit(lit_module(), train_dataloaders=loader())


def test_sharded_strategy_is_refused_by_name(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    t = trainer(tmp_path, [PLoPCallback()], max_steps=1, strategy=ModelParallelStrategy())
    with pytest.raises(PlacementError, match="not ModelParallelStrategy"):
        t.fit(lit_module(), train_dataloaders=loader())


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown method 'plopp'; choose one of"):
        PLoPCallback(method="plopp")


def test_token_ids_from_batches_drops_padding():
    rows = token_ids_from_batches(loader(n=4, length=10), num_samples=3)
    assert [len(r) for r in rows] == [5, 10, 5]


@pytest.mark.slow
def test_readme_example_runs_as_written(smollm2_checkpoint, tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- callback-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README has no callback example"
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    trainer, callback = namespace["trainer"], namespace["callback"]
    assert trainer.global_step == 3
    assert callback.placement.method == "plop" and len(callback.placement.kinds) == 3
