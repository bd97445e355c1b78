"""Attention backends agree; stochastic depth; activation checkpointing; per-block compile."""

from __future__ import annotations

import time

import pytest
import torch

from dinosys.errors import UserError
from dinosys.models import apply_activation_checkpointing, compile_blocks, create_backbone
from dinosys.models.attention import xformers_available, xformers_unusable_reason
from dinosys.models.block import Block


def _crops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 28, 28), (6, 3, 12, 12), (2, 3, 16, 20)]
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def _features(model, crops, masks=None):
    with torch.no_grad():
        outs = model(crops, masks)
    return [o["x_prenorm"] for o in outs]


@pytest.mark.parametrize("registers", [0, 4])
def test_sdpa_and_math_agree_fp32(registers):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny", num_registers=registers, attn_backend="sdpa").eval()
    crops = _crops()
    masks = [torch.rand(4, 49) < 0.3, None, None]
    ref = _features(model, crops, masks)
    model.set_attn_backend("math")
    assert all(b.attn.backend == "math" for b in model.blocks)
    for a, b in zip(_features(model, crops, masks), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_explicit_xformers_on_cpu_is_a_clear_error():
    model = create_backbone("vit_tiny", depth=1, attn_backend="xformers")
    with pytest.raises(UserError, match="xformers"):
        model(torch.randn(1, 3, 28, 28))


def test_auto_backend_is_sdpa_on_cpu():
    from dinosys.models.attention import resolve_backend

    assert resolve_backend("auto", torch.randn(1)) == "sdpa"
    assert resolve_backend("math", torch.randn(1)) == "math"


@pytest.mark.gpu
@pytest.mark.skipif(not xformers_available(), reason="xformers not installed")
def test_xformers_packed_matches_sdpa_and_math_on_gpu():
    reason = xformers_unusable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_reg", attn_backend="math").cuda().eval()
    crops = _crops("cuda")
    masks = [torch.rand(4, 49, device="cuda") < 0.3, None, None]
    ref = _features(model, crops, masks)
    for backend in ("sdpa", "xformers"):
        model.set_attn_backend(backend)
        try:
            outs = _features(model, crops, masks)
            tol = 1e-5
        except NotImplementedError:  # some xformers builds have no fp32 kernel: compare in bf16
            assert backend == "xformers"
            outs = [o.float() for o in _features(model.bfloat16(), [c.bfloat16() for c in crops],
                                                 masks)]
            model.float()
            tol = 5e-2
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    # bf16: auto picks xformers and matches sdpa in bf16
    model.bfloat16().set_attn_backend("auto")
    bf = [c.bfloat16() for c in crops]
    auto = _features(model, bf, masks)
    model.set_attn_backend("sdpa")
    for a, b in zip(auto, _features(model, bf, masks)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def _block(rate: float) -> Block:
    return Block(8, 2, "mlp", 32, 1e-5, rate, "sdpa").train()


def test_efficient_stochastic_depth_runs_branch_on_a_subset():
    block = _block(0.5)
    xs = [torch.randn(10, 3, 8), torch.randn(4, 5, 8)]
    seen: list[int] = []

    def branch(parts):
        seen.extend(p.shape[0] for p in parts)
        return [torch.ones_like(p) for p in parts]

    outs = block._add_residual(xs, branch)
    assert seen == [5, 2]  # floor((1 - 0.5) * B)
    for x, o, subset in zip(xs, outs, seen):
        delta = (o - x)[:, 0, 0]
        changed = delta.abs() > 0
        assert int(changed.sum()) == subset
        scale = x.shape[0] / subset
        torch.testing.assert_close(delta[changed], torch.full((subset,), scale))
    block.eval()
    outs = block._add_residual(xs, branch)
    torch.testing.assert_close(outs[0], xs[0] + 1)


def test_per_sample_drop_path_at_low_rate():
    block = _block(0.1)
    x = torch.zeros(4000, 1, 8)
    torch.manual_seed(0)
    out = block._add_residual([x], lambda parts: [torch.ones_like(p) for p in parts])[0]
    values = out[:, 0, 0]
    dropped = (values == 0).float().mean().item()
    assert 0.08 < dropped < 0.12
    torch.testing.assert_close(values[values != 0], torch.full_like(values[values != 0], 1 / 0.9))


def test_drop_path_schedule_and_training_forward():
    model = create_backbone("vit_tiny", drop_path_rate=0.4, drop_path_uniform=False).train()
    rates = [b.drop_path for b in model.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.4) < 1e-6
    out = model(_crops())
    loss = sum(o["x_norm_clstoken"].sum() for o in out)
    loss.backward()
    assert model.blocks[-1].mlp.fc1.weight.grad is not None


def _grads(model, crops, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = model(crops, [torch.rand(4, 49) < 0.3, None, None])
    loss = sum((o["x_norm_patchtokens"] ** 2).mean() + o["x_norm_clstoken"].sum() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_activation_checkpointing_gives_equal_gradients(drop_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_reg", depth=3, drop_path_rate=drop_path,
                            layerscale_init=0.5).train()
    crops = _crops()
    loss_ref, ref = _grads(model, crops, seed=7)
    names_before = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model)
    assert all(b.activation_checkpointing for b in model.blocks)
    assert [n for n, _ in model.named_parameters()] == names_before
    loss_ac, got = _grads(model, crops, seed=7)
    torch.testing.assert_close(loss_ac, loss_ref)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compile_blocks_matches_eager():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny", depth=1, embed_dim=64, num_heads=2).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)["x_prenorm"]
    keys = list(model.state_dict())
    start = time.time()
    compile_blocks(model)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        got = model(x)["x_prenorm"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert time.time() - start < 300
