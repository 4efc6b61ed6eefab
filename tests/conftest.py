"""Every test starts from the same random state, so a result never depends on which tests ran before it
(CI once failed a test whose LoRA init drew from the global torch RNG left by earlier tests)."""
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_rngs():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
