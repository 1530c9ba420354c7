"""Bottleneck adapters (Houlsby et al., arXiv 1902.00751): a small network ``up(act(down(h)))``
added to a sublayer's output ``h``, after each layer's attention and/or its MLP, while every
weight of the model stays frozen.

Written here because no maintained library offers them for polm's stack: PEFT has no bottleneck
adapter (its tuners are LoRA and its relatives, IA3, prompt methods), and the ``adapters``
library (AdapterHub) requires transformers 4.x (``adapters`` 1.3.0: ``transformers~=4.57.6``;
polm runs transformers 5).

An adapter reads the sublayer's output projection (``self_attn.o_proj``, ``mlp.down_proj``: the
names Llama, Qwen2, Mistral and Gemma share) through a forward hook, so the base's weights and
their names stay as they were. ``up`` starts at zero: the adapted model starts as its base.

A ``bottleneck-adapter`` checkpoint holds ``bottleneck_config.json`` and
``adapter_model.safetensors`` (the adapters' weights only) and names its base as its parent,
like a ``peft-adapter``. Unlike LoRA it cannot be folded into the base's weights (the
non-linearity sits between ``down`` and ``up``), so it is evaluated and served unmerged, on the
transformers backend.
"""

from __future__ import annotations

import json
from pathlib import Path

from polm.errors import PolmError

FORMAT = "bottleneck-adapter"
CONFIG = "bottleneck_config.json"
WEIGHTS = "adapter_model.safetensors"
# placement -> the output projection whose output the adapter reads, by module-name suffix
PLACEMENTS = {"attention": ("self_attn.o_proj",), "mlp": ("mlp.down_proj",)}
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
CHILD = "bottleneck"  # the adapter's name under its projection (state dict: <proj>.bottleneck.*)


def _bottleneck_class():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        """``h + up(act(down(h)))`` on the output ``h`` of the module it is attached to."""

        def __init__(self, width: int, size: int, non_linearity: str, like: torch.Tensor):
            super().__init__()
            kw = {"dtype": like.dtype, "device": like.device}
            self.down = nn.Linear(width, size, **kw)
            self.up = nn.Linear(size, width, **kw)
            self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[
                non_linearity
            ]()
            nn.init.normal_(self.down.weight, std=1e-2)  # Houlsby's near-identity start
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(self.act(self.down(h)))

    return Bottleneck


def _hook(module, args, output):
    return getattr(module, CHILD)(output)


def targets(model, placement) -> list[str]:
    """The names of the modules an adapter goes after, for each placement asked for."""
    names = [n for n, _ in model.named_modules()]
    found = []
    for place in placement:
        hits = [n for n in names if n.endswith(PLACEMENTS[place])]
        if not hits:
            raise PolmError(
                f"bottleneck adapters after the {place} need modules named "
                f"*{' or *'.join(PLACEMENTS[place])}; {type(model).__name__} has none."
            )
        found += hits
    return sorted(found)


def add_adapters(model, config: dict) -> list[str]:
    """Attach an adapter after each target of ``config`` (reduction_factor, placement,
    non_linearity), freeze everything else, and return the targets' names."""
    Bottleneck = _bottleneck_class()
    width = model.config.get_text_config().hidden_size
    size = max(1, width // config["reduction_factor"])
    names = config.get("targets") or targets(model, config["placement"])
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = modules.get(name)
        if module is None:
            raise PolmError(f"the adapter's target {name} is not a module of this model.")
        module.add_module(CHILD, Bottleneck(width, size, config["non_linearity"], module.weight))
        module.register_forward_hook(_hook)
    return names


def targets_of(model) -> list[str]:
    """The names of the modules that carry an adapter."""
    return sorted(n for n, m in model.named_modules() if CHILD in m._modules)


def adapter_state(model) -> dict:
    """The adapters' weights only (``<target>.bottleneck.{down,up}.{weight,bias}``)."""
    marker = f".{CHILD}."
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if marker in k}


def save(model, config: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    state = adapter_state(model)
    if not state:
        raise PolmError("this model carries no bottleneck adapters to save.")
    save_file(state, str(Path(directory) / WEIGHTS))
    (Path(directory) / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load(model, directory: Path):
    """``model`` with the adapters stored in ``directory`` attached (in place; returned)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise PolmError(
            f"{directory} is marked {FORMAT} but lacks {CONFIG} or {WEIGHTS}; expected the "
            "output of align.sft with method: adapter."
        )
    config = json.loads((directory / CONFIG).read_text())
    add_adapters(model, config)
    state = load_file(str(directory / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if f".{CHILD}." in k]
    if missing or unexpected:
        raise PolmError(
            f"{directory}: the adapter's weights do not fit its base "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    return model
