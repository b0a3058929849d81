"""Under CPU bf16 autocast the KD family computes its softmaxes in fp32, on the logits the models
produced: a softmax / KL of bf16 logits loses enough precision to turn KD's KL negative."""

import pytest
import torch

TERMS = [
    ([{"kind": "kd", "temperature": 4.0}], {}),
    ([{"kind": "dkd", "warmup": 0}], {}),
    ([{"kind": "lskd"}], {}),
    ([{"kind": "kd", "temperature": 4.0}], {"logit_standardization": {"enabled": True}}),
]


def _sharpen(model: torch.nn.Module, scale: float) -> None:
    """Large logits (|z| ~ 10s), where bf16's 8-bit mantissa visibly moves a softmax."""
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        fc.weight.mul_(scale)


@pytest.mark.parametrize(("loss", "recipe"), TERMS, ids=["kd", "dkd", "lskd", "authors_std"])
def test_kd_family_losses_equal_fp32_maths_on_the_bf16_models_logits(zoo_distiller, loss, recipe):
    torch.manual_seed(0)
    d = zoo_distiller([{"kind": "ce"}, *loss], **recipe)
    d.train()
    _sharpen(d.student, 40.0)
    _sharpen(d.teacher, 60.0)
    x, y, idx = torch.randn(32, 3, 8, 8), torch.arange(32) % 10, torch.arange(32)
    made = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, out, k=k: made.__setitem__(k, out.detach()))
        for k, m in (("s", d.student), ("t", d.teacher))
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fast = d(x, y, idx, epoch=100)
    for h in hooks:
        h.remove()
    assert made["s"].dtype == torch.bfloat16  # the models' logits really are bf16 here
    # The reference: the same logit values, every loss computed in fp32 (no autocast).
    hooks = [
        m.register_forward_hook(lambda mod, i, out, k=k: made[k].float())
        for k, m in (("s", d.student), ("t", d.teacher))
    ]
    _, ref = d(x, y, idx, epoch=100)
    for h in hooks:
        h.remove()
    kind = loss[0]["kind"]
    assert ref[kind].item() > 0
    assert fast[kind].item() == pytest.approx(ref[kind].item(), rel=2e-5)
    assert fast["ce"].item() == pytest.approx(ref["ce"].item(), rel=2e-5)
