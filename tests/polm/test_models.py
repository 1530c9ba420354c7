import pytest
import torch

from polm.models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_architectures_build_run_and_reload(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, hidden_size=64, num_layers=2, intermediate_size=128)
    assert model.config.model_type == arch
    x = torch.randint(0, 384, (2, 16))
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)


def test_same_seed_same_weights():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
