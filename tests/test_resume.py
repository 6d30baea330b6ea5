"""Resumable fit (issue 13 §3): a fit killed with a real SIGKILL and started again with the same
command finishes bit-identically to an uninterrupted one; a checkpoint of another fit is
refused."""

import os
import signal
import sys
import traceback

import pytest
import torch
from torch import nn

import ssse
import ssse.gradients
from ssse.cli import main
from ssse.io import load_checkpoint, load_inverse_fisher

F64 = torch.float64
CE = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def forked(fn, crash_at: str) -> int:
    """Runs ``fn`` in a forked child (a real process: torch is inherited, not imported again)
    with ``SSSE_CRASH_AT=crash_at``, one thread; returns its exit code (``-9``: killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ["SSSE_CRASH_AT"] = crash_at
            torch.set_num_threads(1)
            code = int(fn() or 0)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    X = torch.randn(300, 6, dtype=F64)
    y = torch.randint(0, 3, (300,))
    return model, X, y


@pytest.mark.parametrize("curvature", ["empirical", "mc"])
def test_a_killed_fit_resumes_bit_identically(tmp_path, one_thread, curvature):
    model, X, y = problem()
    kwargs = dict(damping=1e-2, block_size=20, weight_decay=1e-3, chunk_size=32,
                  curvature=curvature, mc_samples=2, seed=5, progress=False)
    whole = ssse.fit_inverse_fisher(model, CE, (X, y), checkpoint=tmp_path / "whole.ck",
                                    every=64, **kwargs)
    path = tmp_path / "fit.ck"
    # dies with SIGKILL right after its third checkpoint (sample 192 of 300)
    code = forked(lambda: ssse.fit_inverse_fisher(model, CE, (X, y), checkpoint=path,
                                                  every=64, **kwargs), "fit-checkpoint:3")
    assert code == -signal.SIGKILL
    _, meta = load_checkpoint(path)
    assert meta["cursor"] == 192 and not meta["complete"]
    resumed = ssse.fit_inverse_fisher(model, CE, [(X[:100], y[:100]), (X[100:], y[100:])],
                                      checkpoint=path, every=64, **kwargs)
    assert torch.equal(resumed.packed, whole.packed)
    assert torch.equal(resumed.probe.sketch, whole.probe.sketch)
    assert resumed.num_samples == whole.num_samples
    if curvature == "empirical":  # and it is the same inverse as without a checkpoint
        plain = ssse.fit_inverse_fisher(model, CE, (X, y), **kwargs)
        assert (resumed.packed - plain.packed).abs().max() <= 1e-12 * plain.packed.abs().max()


def test_a_checkpoint_of_another_fit_is_refused(tmp_path):
    model, X, y = problem()
    path = tmp_path / "fit.ck"
    ssse.fit_inverse_fisher(model, CE, (X, y), damping=1e-2, chunk_size=100, checkpoint=path,
                            progress=False)
    with pytest.raises(ValueError, match=r"belongs to another fit: damping \(0.01 there, 0.02"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=2e-2, checkpoint=path,
                                progress=False)
    with torch.no_grad():
        model[0].bias[0] += 1
    with pytest.raises(ValueError, match="another fit: the model's parameters"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=1e-2, checkpoint=path,
                                progress=False)
    with torch.no_grad():
        model[0].bias[0] -= 1
    with pytest.raises(ValueError, match="another fit: samples"):
        ssse.fit_inverse_fisher(model, CE, (X[:200], y[:200]), damping=1e-2, checkpoint=path,
                                progress=False)
    (tmp_path / "junk.ck").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint of a fit"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=1e-2,
                                checkpoint=tmp_path / "junk.ck", progress=False)
    with pytest.raises(TypeError, match="re-iterable .* to resume a fit .* one-shot"):
        ssse.fit_inverse_fisher(model, CE, iter([(X, y)]), damping=1e-2, checkpoint=path,
                                progress=False)
    with pytest.raises(ValueError, match="every needs a checkpoint"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=1e-2, every=10, progress=False)
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        ssse.fit_inverse_fisher(model, CE, (X, y), damping=1e-2, checkpoint=3, progress=False)


def test_ssse_fisher_killed_while_writing_a_checkpoint_resumes_bit_identically(
        tmp_path, monkeypatch, capsys):
    assert main(["train", "--data", "digits", "--train-limit", "200", "--out", str(tmp_path),
                 "--quiet"]) == 0
    monkeypatch.setattr(ssse.gradients, "MAX_CHUNK_ROWS", 40)  # 5 chunks of per-sample grads
    model = str(tmp_path / "model.safetensors")

    def fisher(out, ck):
        return main(["fisher", "--model", model, "--layout", "rows", "--output", str(out),
                     "--checkpoint", str(ck), "--every", "40", "--threads", "1", "--quiet"])

    threads = torch.get_num_threads()
    try:
        assert fisher(tmp_path / "whole.safetensors", tmp_path / "whole.ck") == 0
        assert not (tmp_path / "whole.ck").exists()  # removed once the inverse is saved
        # killed between writing its third checkpoint and renaming it into place
        ck = tmp_path / "fit.ck"
        code = forked(lambda: fisher(tmp_path / "fisher.safetensors", ck), "atomic-write:3")
        assert code == -signal.SIGKILL
        stale = [p for p in tmp_path.iterdir() if ".ssse-tmp-" in p.name]
        assert len(stale) == 1 and load_checkpoint(ck)[1]["cursor"] == 80
        capsys.readouterr()
        assert fisher(tmp_path / "fisher.safetensors", ck) == 0
        assert f"(resumed from {ck} at sample 80)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    a, _ = load_inverse_fisher(tmp_path / "whole.safetensors")
    b, _ = load_inverse_fisher(tmp_path / "fisher.safetensors")
    assert torch.equal(a.packed, b.packed) and torch.equal(a.probe.sketch, b.probe.sketch)
    assert not ck.exists() and not any(".ssse-tmp-" in p.name for p in tmp_path.iterdir())
