"""LoRA adapters served by name beside their base (in-process through the official `openai`
client): each name answers as its own checkpoint does when polm loads it, also when requests
for the base and both adapters arrive together (on the transformers backend they decode in one
batch; on the ONNX backend, on an export with LoRA slots, each through onnxruntime-genai's
Adapters); `/v1/models` lists each adapter with its base as parent and its lineage; an adapter
trained on another base, or one the ONNX export has no slot for, is refused."""

import asyncio
import functools

import pytest

from polm.errors import PolmError
from polm.evaluate import greedy_generate
from polm.loading import load_model
from polm.tasks import get_task
from serve.state import ServerState, load_state, parse_adapters
from tests.helpers import app_client

pytestmark = pytest.mark.slow
PROMPTS = [ex.prompt for ex in get_task("add").examples("test", 3)]
PROMPTS += [ex.prompt for ex in get_task("compare").examples("test", 3)]


@functools.cache
def own_answers(path) -> list[str]:
    """Greedy answers to PROMPTS of the checkpoint at ``path`` as polm loads it (torch)."""
    from polm.checkpoint import Checkpoint

    model, tok = load_model(Checkpoint.open(path))
    return greedy_generate(model, tok, PROMPTS, max_new_tokens=24)


def serve_and_ask_all(model_dir, loras) -> tuple[ServerState, dict]:
    """Serve ``loras`` by name on ``model_dir``; check /v1/models; ask every name every prompt
    at once; return the state and each name's answers."""
    state = load_state(
        ServerState(), str(model_dir), adapters={name: str(c.path) for name, c in loras.items()}
    )
    assert state.ready, state.failed
    c = app_client(state)
    names = [state.model_id, *loras]

    async def models():
        return [m async for m in c.models.list()]

    listed = {m.id: m for m in asyncio.run(models())}
    assert list(listed) == names
    for name, ckpt in loras.items():
        card = listed[name].model_dump()
        assert card["parent"] == state.model_id
        assert card["polm"]["format"] == "peft-adapter"
        assert card["polm"]["lineage"][0]["content_hash"] == ckpt.manifest.content_hash[:12]

    async def ask_all():
        async def one(name, prompt):
            r = await c.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=24,
            )
            return r.choices[0].message.content

        outs = await asyncio.gather(*[one(name, p) for name in names for p in PROMPTS])
        k = len(PROMPTS)
        return {name: outs[i * k : (i + 1) * k] for i, name in enumerate(names)}

    served = asyncio.run(ask_all())
    import openai

    with pytest.raises(openai.NotFoundError, match="'adder', 'comparer'"):
        asyncio.run(
            c.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
        )
    return state, served


def test_each_name_answers_as_its_own_checkpoint_in_one_mixed_batch(base_ckpt, loras):
    state, served = serve_and_ask_all(base_ckpt.path, loras)
    try:
        # the requests for all three names were decoded together, row by row
        assert state.backend.stats["max_rows"] > len(PROMPTS), state.backend.stats
    finally:
        state.backend.close()
    for name, ckpt in {state.model_id: base_ckpt, **loras}.items():
        assert served[name] == own_answers(ckpt.path), name
    assert served["adder"] != served[state.model_id]
    assert served["comparer"] != served["adder"]


def test_the_onnx_backend_serves_each_adapter_on_an_export_with_lora_slots(
    base_ckpt, loras, onnx_lora
):
    """tiny-base's fp32 export with LoRA slots: the base and each adapter (onnxruntime-genai
    Adapters, converted at start-up) answer as the torch checkpoints do, concurrently."""
    assert onnx_lora.manifest.metrics["onnx.lora_slots"] == 28  # 7 linear layers x 4 blocks
    state, served = serve_and_ask_all(onnx_lora.path, loras)
    state.backend.close()
    assert state.card["backend"] == "onnx"
    for name, ckpt in {state.model_id: base_ckpt, **loras}.items():
        assert served[name] == own_answers(ckpt.path), name
    assert served["adder"] != served[state.model_id]


def test_what_the_onnx_backend_cannot_take_is_refused_by_name(
    loras, onnx_lora, onnx_int4, tmp_path
):
    import json
    import shutil

    from polm.onnxrt import write_onnx_adapter

    adder = loras["adder"].path
    # the int4 export of the add SFT: not the base the adapters were trained on
    state = load_state(ServerState(), str(onnx_int4.path), adapters={"adder": str(adder)})
    assert not state.ready and "trained on a base with content hash" in state.failed
    with pytest.raises(PolmError, match="takes no LoRA adapters: export it with optimize.onnx"):
        write_onnx_adapter(adder, onnx_int4.path, tmp_path / "a.onnx_adapter")
    # an export whose slots miss a module the adapter trained
    slots = json.loads((onnx_lora.path / "lora_slots.json").read_text())
    slots["modules"] = {k: v for k, v in slots["modules"].items() if "q_proj" not in k}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "lora_slots.json").write_text(json.dumps(slots))
    with pytest.raises(PolmError, match=r"q_proj\.lora_A\.weight has no slot"):
        write_onnx_adapter(adder, tmp_path / "export", tmp_path / "a.onnx_adapter")
    dora = shutil.copytree(adder, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(PolmError, match="DoRA; the ONNX backend serves plain LoRA"):
        write_onnx_adapter(dora, onnx_lora.path, tmp_path / "a.onnx_adapter")
    assert not (tmp_path / "a.onnx_adapter").exists()


def test_an_adapter_of_another_base_is_refused_at_start(add_sft, loras):
    state = load_state(
        ServerState(), str(add_sft.path), adapters={"adder": str(loras["adder"].path)}
    )
    assert not state.ready and "trained on a base with content hash" in state.failed
    state = load_state(ServerState(), str(add_sft.path), adapters={"self": str(add_sft.path)})
    assert not state.ready and "not a peft-adapter" in state.failed


def test_the_adapters_argument_reads_name_dir_pairs():
    assert parse_adapters("a=/x, b=/y") == {"a": "/x", "b": "/y"}
    assert parse_adapters(None) == {}
    for bad in ("a", "=x", "a=/x,a=/y"):
        with pytest.raises(PolmError, match="adapters"):
            parse_adapters(bad)
