"""Fixtures shared by the test files: the small served digits model, one torch thread."""

import pytest
import torch

from ssse.cli import main
from ssse.curvature import get_curvature, unregister_curvature
from ssse.curvature.kfac import ekfac

MODEL, FISHER = "model.safetensors", "inverse_fisher.safetensors"


@pytest.fixture(scope="session")
def served_digits(tmp_path_factory):
    """``served_digits(seed)``: a folder with a digits model trained on 200 samples with
    ``seed`` and its inverse (one block per output row), made once per session."""
    made = {}

    def folder(seed: int = 0):
        if seed not in made:
            d = tmp_path_factory.mktemp(f"served-seed{seed}")
            assert main(["train", "--data", "digits", "--train-limit", "200", "--seed",
                         str(seed), "--out", str(d), "--quiet"]) == 0
            assert main(["fisher", "--model", str(d / MODEL), "--layout", "rows", "--out",
                         str(d), "--quiet"]) == 0
            made[seed] = d
        return made[seed]
    return folder


@pytest.fixture
def one_thread():
    # the same reductions in every run: bitwise equal tensors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Kronecker-factored curvature variants, registered for a test and removed after ----

@pytest.fixture
def exact_ekfac():
    curv = ekfac("ekfac_exact", refresh="exact")
    yield curv
    unregister_curvature(curv.name)


@pytest.fixture
def compact_curvatures():
    made = ekfac("ekfac_exact_compact", refresh="exact", storage="compact")
    yield [get_curvature("kfac_compact"), get_curvature("ekfac_compact"), made]  # built in
    unregister_curvature(made.name)
