"""bf16: auto resolves from what the machine computes natively, is recorded as the value it
resolved to, and POLM_BF16 overrides only auto."""

import re
from pathlib import Path

import pytest
import torch

from polm.precision import cpu_flags, cpu_has_native_bf16, resolve_bf16


def _flags_from_cpuinfo() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def test_auto_follows_this_machines_flags(monkeypatch):
    monkeypatch.delenv("POLM_BF16", raising=False)
    if torch.cuda.is_available():
        expected = torch.cuda.is_bf16_supported()
    else:
        flags = _flags_from_cpuinfo()
        expected = "amx_bf16" in flags or "avx512_bf16" in flags
    assert resolve_bf16("auto") is expected


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu sse2 avx2 fma", False),  # AMD EPYC, AVX2 only: bf16 would be emulated
        ("avx2 avx512f avx512bw", False),  # AVX-512 without its bf16 extension
        ("avx2 avx512f avx512_bf16", True),  # Zen 4, Cooper Lake
        ("avx2 amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids
    ],
)
def test_native_bf16_from_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == set(flags.split())
    assert cpu_has_native_bf16(cpu_flags(info)) is native
    assert cpu_flags(tmp_path / "missing") == set()


def test_env_overrides_auto_only(monkeypatch):
    for value, resolved in (("0", False), ("1", True), ("off", False), ("true", True)):
        monkeypatch.setenv("POLM_BF16", value)
        assert resolve_bf16("auto") is resolved
        assert resolve_bf16(True) is True and resolve_bf16(False) is False
    monkeypatch.setenv("POLM_BF16", "maybe")
    with pytest.raises(ValueError, match="POLM_BF16"):
        resolve_bf16("auto")


def test_settings_record_the_resolved_value(monkeypatch):
    from align.ppo import PPOSettings
    from align.sft import SFTSettings
    from polm.settings import parse_settings

    for env, resolved in (("0", False), ("1", True)):
        monkeypatch.setenv("POLM_BF16", env)
        assert SFTSettings(task="add").model_dump()["bf16"] is resolved  # the default is auto
        assert SFTSettings(task="add", bf16="auto").bf16 is resolved
        assert SFTSettings(task="add", bf16=not resolved).bf16 is (not resolved)
        assert PPOSettings(task="add").bf16 is False  # PPO keeps fp32 unless asked
        assert PPOSettings(task="add", bf16="auto").bf16 is resolved
    with pytest.raises(Exception, match="bf16"):
        parse_settings("align.sft", {"task": "add", "bf16": "sometimes"})


def test_validate_checks_settings_without_importing_torch(tmp_path):
    """Where no GPU driver is there, `auto` is settled from the CPU's flags alone: `polm
    validate` (which checks every stage's settings) does not pay torch's import."""
    import subprocess
    import sys

    from polm.precision import GPU_DEVICE_FILES

    if any(Path(f).exists() for f in GPU_DEVICE_FILES):
        pytest.skip("a GPU driver is present: torch is asked")
    recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    code = (
        "import sys; from polm.cli import main; rc = main(['validate', sys.argv[1]]); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok (" in proc.stdout and proc.stdout.strip().endswith("False"), proc.stdout
