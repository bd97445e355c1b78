"""Per-block torch.compile: one graph per crop-size set, no recompiles across steps."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from dinosys.models import compile_blocks, create_backbone


@pytest.mark.slow
def test_blocks_compile_once_for_two_crop_shapes() -> None:
    """The recipes' uniform drop path 0.4: every block of the student shares one graph over
    both crop-size groups, the teacher one eval graph. (A rate ramp compiles one graph per
    distinct rate: dynamo guards on the block's float rate; compile_blocks allows that many.)"""
    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(0)
    student = create_backbone("vit_tiny", drop_path_rate=0.4, attn_backend="sdpa")
    teacher = create_backbone("vit_tiny", attn_backend="sdpa").eval()
    reference = create_backbone("vit_tiny", attn_backend="sdpa").eval()
    reference.load_state_dict(teacher.state_dict())
    compile_blocks(student, backend=counter)
    compile_blocks(teacher, backend=counter)
    after_first = None
    for _ in range(3):
        globals_, locals_ = torch.randn(4, 3, 28, 28), torch.randn(8, 3, 16, 16)
        outs = student([globals_, locals_])
        sum(o["x_norm_clstoken"].sum() for o in outs).backward()
        with torch.no_grad():
            got = teacher(globals_)["x_norm_clstoken"]
            torch.testing.assert_close(got, reference(globals_)["x_norm_clstoken"])
        if after_first is None:
            after_first = counter.frame_count
    assert after_first == counter.frame_count  # nothing recompiled after the first step
    assert counter.frame_count == 2
