"""GPU paths, checked against the CPU: run by ``benchmarks/device_check.sh`` on a CUDA machine
(``pytest -m cuda``); skipped where no CUDA device is present. The last test runs the device
check script itself in its CPU dry-run mode so it cannot rot between GPU sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(**kw):
    from mammut import MaMMUT

    torch.manual_seed(0)
    return MaMMUT(dim=64, num_tokens=300, depth=2, heads=2, dim_head=32, bos_id=1, eos_id=2, pad_id=0,
                  vit=dict(image_size=32, patch_size=8, dim=64, depth=2, heads=2, dim_head=32), **kw)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@needs_cuda
def test_losses_and_gradients_match_the_cpu(no_tf32):
    cpu = tiny(shuffle_passes=False)
    gpu = tiny(shuffle_passes=False).cuda()
    text = torch.randint(3, 300, (4, 12))
    images = torch.rand(4, 3, 32, 32)
    a = cpu.compute_losses(text, images)
    b = gpu.compute_losses(text.cuda(), images.cuda())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.cpu(), atol=1e-4, rtol=1e-4)
    a.total.backward()
    b.total.backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad.cpu(), atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_on_cuda_gives_the_cpu_tokens(strategy, no_tf32):
    cpu = tiny().eval()
    gpu = tiny().cuda().eval()
    images = torch.rand(3, 3, 32, 32)
    kw = dict(max_new_tokens=12, strategy=strategy, num_beams=3 if strategy == "beam" else 1)
    ref = cpu.generate(images, **kw)
    torch.testing.assert_close(gpu.generate(images.cuda(), **kw).cpu(), ref, atol=0, rtol=0)
    # static cache and the compiled step (CUDA graphs on CUDA): the same tokens
    torch.testing.assert_close(gpu.generate(images.cuda(), static_cache=True, **kw).cpu(), ref, atol=0, rtol=0)
    torch.testing.assert_close(gpu.generate(images.cuda(), compile=True, **kw).cpu(), ref, atol=0, rtol=0)


@pytest.mark.cuda
@needs_cuda
def test_bf16_weights_decode():
    model = tiny().cuda().eval()
    images = torch.rand(4, 3, 32, 32, device="cuda")
    ref = model.generate(images, max_new_tokens=10)
    half = tiny().cuda().to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    out = half.generate(images.to(torch.bfloat16), max_new_tokens=10)
    assert out.shape == ref.shape and out.dtype == torch.long
    assert (out == ref).float().mean() > 0.3  # reported exactly by device_check.py


@pytest.mark.cuda
@needs_cuda
def test_trainer_runs_on_cuda_in_bf16(tmp_path):
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    cfg = load_config("tiny", ["--train.device", "cuda", "--train.precision", "bf16", "--train.steps", "20",
                               "--train.out_dir", str(tmp_path / "run"), "--train.progress", "false"])
    result = Trainer(cfg).fit()
    assert result.step == 20 and all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


@pytest.mark.slow
def test_device_check_script_dry_run(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    figures = json.loads(out.read_text())
    assert figures["fsdp"].startswith("ok") and figures["embed_images_per_s"] > 0
    assert all(figures["decode_checks"][k] for k in figures["decode_checks"] if k != "bf16_agreement")
    assert "train step" in proc.stdout and "tokens/s" in proc.stdout
