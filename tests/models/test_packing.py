"""Token packing: the packed forward (one (T, D) tensor through every block) is the list forward."""

from __future__ import annotations

import pytest
import torch

from dinosys.models import create_backbone, enable_token_packing


def run(model: torch.nn.Module, crops: list[torch.Tensor], masks: list, seed: int
        ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    outs = model(crops, masks=masks)
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].square().mean()
               for o in outs)
    loss.backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend,rate", [("sdpa", 0.0), ("sdpa", 0.4), ("math", 0.05)])
def test_packed_equals_unpacked(rate: float, backend: str) -> None:
    torch.manual_seed(0)
    plain = create_backbone("vit_tiny", drop_path_rate=rate, attn_backend=backend,
                            num_registers=2, layerscale_init=1e-1).double()
    packed = create_backbone("vit_tiny", drop_path_rate=rate, attn_backend=backend,
                             num_registers=2, layerscale_init=1e-1).double()
    packed.load_state_dict(plain.state_dict())
    enable_token_packing(packed)
    g = torch.randn(6, 3, 28, 28, dtype=torch.float64)
    loc = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    extra = torch.randn(3, 3, 28, 28, dtype=torch.float64)  # same size as g: one group
    masks = [torch.rand(6, 49) < 0.3, None, None]
    for seed in (1, 2):
        ref_out, ref_grad = run(plain, [g, loc, extra], masks, seed)
        out, grad = run(packed, [g, loc, extra], masks, seed)
        for a, b in zip(ref_out, out):
            for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
                torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-10)
        assert ref_grad.keys() == grad.keys()
        for name, value in ref_grad.items():
            torch.testing.assert_close(grad[name], value, rtol=1e-9, atol=1e-10, msg=name)
    with torch.no_grad():  # eval: every sample, no randomness
        plain.eval()
        packed.eval()
        torch.testing.assert_close(packed([g, loc])[1]["x_prenorm"],
                                   plain([g, loc])[1]["x_prenorm"])
