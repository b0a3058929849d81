"""Shared test settings: small thread count and deterministic seeds for the 2-core CI machine."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
