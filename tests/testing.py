"""Shared test parameters: every kernel test runs over DTYPES x DEVICES."""

import torch

import ssse_ext

DTYPES = [torch.float32, torch.float64]
DEVICES = [torch.device("cpu")]
if torch.cuda.is_available() and ssse_ext.build_info()["cuda_compiled"]:
    DEVICES.append(torch.device("cuda"))

# float64 results are compared at this relative error (rounding of O(B) sums and of a Cholesky
# inverse of a well-conditioned matrix).
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against the reference b, computed in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def flat(model) -> torch.Tensor:
    """The model's parameters as one flat vector (named_parameters() order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_state(state: dict, model) -> torch.Tensor:
    """The parameters of a state_dict as one flat vector, in the model's order."""
    return torch.cat([state[k].reshape(-1) for k, _ in model.named_parameters()])
