"""LoRA adapters served by name beside their base (the transformers backend, in-process through
the official `openai` client): each name answers as its own checkpoint does when polm loads it,
also when requests for the base and both adapters arrive together and decode in one batch;
`/v1/models` lists each adapter with its base as parent and its lineage; an adapter trained on
another base is refused at start-up."""

import asyncio

import pytest

from polm.errors import PolmError
from polm.evaluate import greedy_generate
from polm.loading import load_model
from polm.tasks import get_task
from serve.state import ServerState, load_state, parse_adapters
from tests.helpers import app_client, shared

pytestmark = pytest.mark.slow
PROMPTS = [ex.prompt for ex in get_task("add").examples("test", 3)]
PROMPTS += [ex.prompt for ex in get_task("compare").examples("test", 3)]


@pytest.fixture(scope="module")
def loras(base_ckpt, tmp_path_factory):
    """Two LoRA SFTs of tiny-base: one on add, one on compare."""
    from align.sft import SFTSettings
    from align.sft import run as sft

    def build(task):
        s = SFTSettings(
            task=task,
            method="lora",
            output_format="peft-adapter",
            max_steps=40,
            learning_rate=5e-3,
        )
        return shared(tmp_path_factory, f"lora_{task}", lambda out: sft([base_ckpt], s, out))

    return {"adder": build("add"), "comparer": build("compare")}


def test_each_name_answers_as_its_own_checkpoint_in_one_mixed_batch(base_ckpt, loras):
    state = load_state(
        ServerState(),
        str(base_ckpt.path),
        adapters={name: str(c.path) for name, c in loras.items()},
    )
    assert state.ready, state.failed
    try:
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

            jobs = [one(name, p) for name in names for p in PROMPTS]
            outs = await asyncio.gather(*jobs)
            k = len(PROMPTS)
            return {name: outs[i * k : (i + 1) * k] for i, name in enumerate(names)}

        served = asyncio.run(ask_all())
        # the requests for all three names were decoded together, row by row
        assert state.backend.stats["max_rows"] > len(PROMPTS), state.backend.stats
        own = {state.model_id: base_ckpt, **loras}
        for name, ckpt in own.items():
            model, tok = load_model(ckpt)
            assert served[name] == greedy_generate(model, tok, PROMPTS, max_new_tokens=24), name
        assert served["adder"] != served[state.model_id]
        assert served["comparer"] != served["adder"]
        import openai

        with pytest.raises(openai.NotFoundError, match="'adder', 'comparer'"):
            asyncio.run(
                c.chat.completions.create(
                    model="other", messages=[{"role": "user", "content": "x"}]
                )
            )
    finally:
        state.backend.close()


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
