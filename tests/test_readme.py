"""The README's first Python example runs as printed.

Why: it is the first code a user copies; a renamed function or argument would break it silently,
since nothing else executes the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_example_runs_and_does_what_its_comments_say() -> None:
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)  # our own README, not user input
    s, s_ft, deploy, loss = scope["s"], scope["s_ft"], scope["deploy"], scope["loss"]
    assert scope["logits"].shape == (8, 100) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()  # the NORM loss trains the student through FT
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_ft.parameters())
    # "same class and parameter count as `s`, same logits (eval mode)"
    assert type(deploy) is type(s)
    assert sum(p.numel() for p in deploy.parameters()) == sum(p.numel() for p in s.parameters())
    x = scope["x"]
    with torch.no_grad():
        torch.testing.assert_close(deploy.eval()(x), s_ft.eval()(x), atol=1e-4, rtol=1e-4)
