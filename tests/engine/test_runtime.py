"""engine.runtime: what ``engine.amp: auto`` and ``engine.channels_last: auto`` (the defaults)
pick on each kind of device, and YAML's bare off."""

import pytest
import torch

from normkd.config import load_recipe
from normkd.data.build import Data
from normkd.engine import assemble
from normkd.engine.runtime import Runtime, native_bf16, resolve_amp
from support import DEMO

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "avx512_bf16, amx, picked",
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "off")],
)
def test_auto_is_bf16_exactly_on_cpus_that_run_it_natively(monkeypatch, avx512_bf16, amx, picked):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    rt = Runtime(CPU, amp="auto")
    assert rt.amp == picked
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu") == (picked == "bf16")
        if picked == "bf16":
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_auto_on_cuda_asks_for_native_bf16_not_emulation(monkeypatch):
    asked = []
    native = {"on": True}

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return not including_emulation and native["on"]  # emulation alone never counts

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    for on, picked in ((True, "bf16"), (False, "off")):
        native["on"] = on
        assert resolve_amp("auto", torch.device("cuda")) == picked
    assert asked == [False, False]


def test_explicit_settings_pass_through_and_other_devices_stay_fp32(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for amp in ("off", "bf16", "fp16"):
        assert resolve_amp(amp, CPU) == amp
    assert not native_bf16(torch.device("mps"))
    assert resolve_amp("auto", torch.device("mps")) == "off"


def test_a_bare_off_in_yaml_or_set_means_off(tmp_path):
    recipe = load_recipe(DEMO / "kd.yaml", ["engine.amp=off"])  # YAML reads off as False
    assert recipe.engine.amp == "off"
    assert load_recipe(DEMO / "kd.yaml", ["engine.amp=auto"]).engine.amp == "auto"


def test_defaults_are_auto_and_channels_last_follows_reduced_precision(monkeypatch):
    """A recipe that says nothing runs ``amp: auto`` and ``channels_last: auto``; channels-last
    memory comes on exactly when autocast runs bf16 / fp16, and explicit settings stand."""
    engine = load_recipe(DEMO / "kd.yaml").engine
    assert (engine.amp, engine.channels_last) == ("auto", "auto")
    for native, cl in ((True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert Runtime(CPU, amp="auto", channels_last="auto").channels_last is cl
    for amp, cl in (("fp16", True), ("bf16", True), ("off", False)):
        assert Runtime(CPU, amp=amp, channels_last="auto").channels_last is cl
        assert Runtime(CPU, amp=amp, channels_last=False).channels_last is False
    assert Runtime(CPU, amp="off", channels_last=True).channels_last is True
    assert load_recipe(DEMO / "kd.yaml", ["engine.channels_last=on"]).engine.channels_last is True


def test_auto_on_a_native_bf16_cpu_builds_a_channels_last_run(monkeypatch):
    """What the defaults do to a run on such a CPU: the student's conv weights are channels-last
    and its forward under the run's autocast gives bf16 logits."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    recipe = load_recipe(DEMO / "vanilla.yaml", ["engine.device=cpu"])
    rt = Runtime(CPU, amp=recipe.engine.amp, channels_last=recipe.engine.channels_last)
    data = Data(None, None, 10, (3, 8, 8), train_size=64)
    job = assemble(recipe, rt, data=data, dry_run=True)
    conv = next(m for m in job.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    with rt.autocast():
        assert job.student(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16
