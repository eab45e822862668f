import logging
import os

import pytest
import torch

# Two threads at most; under pytest-xdist the cores are shared by the workers, one thread each where they fill them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """(base model folder, image encoder folder) of a tiny random SD backbone saved with save_pretrained."""
    from ipa_train.toy.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A folder with a tiny random full CLIPModel and its offline tokenizer."""
    from ipa_train.toy.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
