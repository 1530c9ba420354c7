import asyncio
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align.sft import SFTSettings, run
from polm.checkpoint import Checkpoint, staging
from polm.errors import PolmError
from polm.evaluate import chat_prompt, evaluate_checkpoint, greedy_generate
from polm.loading import load_model
from polm.tasks import get_task
from tests.helpers import ADD_SFT_STEPS

# Budgets are in steps, not seconds. Thresholds fail if training does nothing: the base
# model scores <= 5% on add (tests/polm/test_eval.py).
ADD = get_task("add")
FULL_STEPS = ADD_SFT_STEPS  # the shared add_sft fixture (tests/conftest.py)


def sft(inputs, out, **kw):
    kw.setdefault("logging_steps", 10)
    return run(inputs, SFTSettings(**kw), out)


@pytest.fixture(scope="module")
def full_sft(add_sft):
    return add_sft


def _state(ckpt):
    model, _ = load_model(ckpt)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_sft_learns_addition_and_changes_every_weight(full_sft, base_ckpt):
    m = evaluate_checkpoint(full_sft, ["add"], n=200)
    assert m["eval.add.accuracy"] >= 0.6, m
    man = full_sft.manifest
    assert man.stage == "align.sft" and man.format == "hf"
    assert man.parents[0].content_hash == base_ckpt.manifest.content_hash
    assert man.metrics["train.steps"] == FULL_STEPS
    assert man.metrics["train.last_loss"] < man.metrics["train.first_loss"] / 5
    before, after = _state(base_ckpt), _state(full_sft)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_lora_sft_trains_the_adapter_and_folds_it_in(base_ckpt, tmp_path):
    """(150 steps reaching 40% exact match on add: bench/calibrations/test_sft.py.)"""
    ckpt = sft(
        [base_ckpt], tmp_path / "lora", task="add", method="lora", learning_rate=5e-3, max_steps=20
    )
    assert ckpt.format == "hf" and not (ckpt.path / "adapter_config.json").exists()
    m = ckpt.manifest.metrics
    assert m["train.trainable_params"] < 0.25 * 1_033_344
    assert m["train.last_loss"] < m["train.first_loss"], m
    before, after = _state(base_ckpt), _state(ckpt)
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        after["model.layers.0.self_attn.q_proj.weight"],
    )  # folded in
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # not trained


def test_lora_adapter_output_loads_on_its_base(base_ckpt, tmp_path):
    ckpt = sft(
        [base_ckpt],
        tmp_path / "adapter",
        task="add",
        method="lora",
        output_format="peft-adapter",
        learning_rate=5e-3,
        max_steps=20,
    )
    assert ckpt.format == "peft-adapter"
    assert (ckpt.path / "adapter_model.safetensors").is_file()
    assert not (ckpt.path / "model.safetensors").exists()
    model, tok = load_model(ckpt)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert evaluate_checkpoint(ckpt, ["add"], n=16)["eval.add.n"] == 16


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prefix_and_prompt_tuning_train_virtual_tokens(method, base_ckpt, tmp_path):
    ckpt = sft(
        [base_ckpt],
        tmp_path / method,
        task="reverse",
        method=method,
        num_virtual_tokens=8,
        learning_rate=1e-2,
        max_steps=20,
    )
    assert ckpt.format == "peft-adapter"
    cfg = json.loads((ckpt.path / "adapter_config.json").read_text())
    assert cfg["num_virtual_tokens"] == 8
    if method == "ptuning":  # P-tuning: a prompt encoder (PEFT's), an MLP by default
        assert cfg["peft_type"] == "P_TUNING" and cfg["encoder_reparameterization_type"] == "MLP"
        assert ckpt.manifest.metrics["train.trainable_params"] < 200_000
    else:
        assert ckpt.manifest.metrics["train.trainable_params"] < 50_000
    assert "eval.reverse.accuracy" in evaluate_checkpoint(ckpt, ["reverse"], n=16)
    # decoding keeps the virtual tokens: the evaluation's answers and the server's are those
    # of PEFT's own forward pass, token by token without a cache (PEFT's generate lost them)
    model, tokenizer = load_model(ckpt)
    prompts = ["reverse abc", "reverse hello"]
    greedy = greedy_generate(model, tokenizer, prompts, max_new_tokens=8)
    assert greedy == [_uncached_greedy(model, tokenizer, p, 8) for p in prompts]
    assert _answers_when_served(ckpt, prompts[0]) == greedy[0].strip()


def _uncached_greedy(model, tokenizer, prompt, n):
    ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    ids, start = ids["input_ids"], ids["input_ids"].shape[1]
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if nxt.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_ptuning_with_the_model_tuned_too_carries_its_tuned_base(base_ckpt, tmp_path):
    ckpt = sft(
        [base_ckpt],
        tmp_path / "pt_tuned",
        task="add",
        method="ptuning",
        tune_model=True,
        learning_rate=1e-3,
        max_steps=20,
    )
    assert ckpt.format == "peft-adapter" and (ckpt.path / "base" / "config.json").is_file()
    assert ckpt.manifest.metrics["train.trainable_params"] > 1_033_344  # the model and encoder
    before = _state(base_ckpt)
    tuned = load_file(ckpt.path / "base" / "model.safetensors")
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        tuned["model.layers.0.self_attn.q_proj.weight"],
    )
    model, _ = load_model(ckpt)  # the adapter on its tuned base, not on the parent
    assert type(model).__name__ == "PeftModelForCausalLM"
    loaded = model.get_base_model().state_dict()
    assert torch.equal(loaded["model.norm.weight"], tuned["model.norm.weight"])
    assert evaluate_checkpoint(ckpt, ["add"], n=16)["eval.add.n"] == 16
    with pytest.raises(ValueError, match="tune_model applies to method: ptuning"):
        SFTSettings(task="add", method="lora", tune_model=True)


def _answers_when_served(ckpt, prompt):
    """The checkpoint served as it is answers a chat request through the OpenAI client."""
    from serve.state import ServerState, load_state
    from tests.helpers import app_client

    state = load_state(ServerState(), str(ckpt.path))
    assert state.ready, state.failed
    try:
        r = asyncio.run(
            app_client(state).chat.completions.create(
                model=state.model_id,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
            )
        )
        assert r.choices[0].message.content is not None and r.usage.completion_tokens > 0
        return r.choices[0].message.content
    finally:
        state.backend.close()


def test_bottleneck_adapters_train_alone_store_on_the_base_and_serve(base_ckpt, tmp_path):
    ckpt = sft(
        [base_ckpt],
        tmp_path / "adapter",
        task="add",
        method="adapter",
        reduction_factor=8,
        learning_rate=5e-3,
        max_steps=20,
    )
    assert ckpt.format == "bottleneck-adapter"
    assert ckpt.manifest.parents[0].content_hash == base_ckpt.manifest.content_hash
    assert not (ckpt.path / "model.safetensors").exists()  # the adapters' weights only
    cfg = json.loads((ckpt.path / "bottleneck_config.json").read_text())
    assert cfg["placement"] == ["attention", "mlp"] and len(cfg["targets"]) == 2 * 4
    # per target: down 128x16 + 16, up 16x128 + 128
    assert ckpt.manifest.metrics["train.trainable_params"] == 8 * (128 * 16 + 16 + 16 * 128 + 128)
    m = ckpt.manifest.metrics
    assert m["train.last_loss"] < m["train.first_loss"], m

    model, _ = load_model(ckpt)
    base = _state(base_ckpt)
    state = model.state_dict()
    assert all(torch.equal(base[k], state[k]) for k in base)  # the base is untouched
    up = state["model.layers.0.mlp.down_proj.bottleneck.up.weight"]
    assert up.abs().sum() > 0  # trained away from its zero start
    ids = torch.tensor([[1, 5, 9, 13]])
    plain, _ = load_model(base_ckpt)
    assert not torch.allclose(model(ids).logits, plain(ids).logits)  # the adapters act
    assert evaluate_checkpoint(ckpt, ["add"], n=16)["eval.add.n"] == 16

    _answers_when_served(ckpt, "12+34")


def test_bottleneck_adapter_settings_are_checked(base_ckpt, tmp_path):
    with pytest.raises(ValueError, match="cannot be folded"):
        SFTSettings(task="add", method="adapter", output_format="hf")
    with pytest.raises(ValueError, match="reduction_factor"):
        SFTSettings(task="add", method="adapter", reduction_factor=0)
    with pytest.raises(ValueError, match="adapter_placement"):
        SFTSettings(task="add", method="adapter", adapter_placement=["embeddings"])


def test_critique_sft_trains_on_the_models_own_answers_and_their_critiques(warm_sft, tmp_path):
    from align.sft import critique_dataset
    from polm.refine import CHECK, REVISE

    s = SFTSettings(task="add", critique=True, n_train=64)
    model, tokenizer = load_model(warm_sft)
    from align.sft import _greedy_answers

    answers = _greedy_answers(model, tokenizer, [e.prompt for e in ADD.examples("train", 64)])
    ds = critique_dataset(s, lambda prompts: _greedy_answers(model, tokenizer, prompts))
    rows = list(ds)
    own = [r for r in rows if len(r["prompt"]) == 1]
    verdicts = [r for r in rows if r["prompt"][-1]["content"] == CHECK]
    revisions = [r for r in rows if r["prompt"][-1]["content"] == REVISE]
    assert len(own) == len(verdicts) == 64  # the model's own answers, held, and judged
    assert sorted(r["completion"][0]["content"] for r in own) == sorted(a.strip() for a in answers)
    wrong = sum(not ADD.score(a, e) for a, e in zip(answers, ADD.examples("train", 64)))
    assert len(revisions) >= wrong > 0  # each wrong answer gets its revision to the reference
    ckpt = sft([warm_sft], tmp_path / "critic", task="add", critique=True, max_steps=10)
    assert ckpt.manifest.settings["critique"] is True and ckpt.format == "hf"
    with pytest.raises(ValueError, match="critic"):
        SFTSettings(task="tool", critique=True)


def test_prefix_cannot_be_merged():
    with pytest.raises(ValueError, match="cannot be merged"):
        SFTSettings(task="add", method="prefix", output_format="hf")


def test_same_seed_gives_identical_bytes(base_ckpt, tmp_path):
    a = sft([base_ckpt], tmp_path / "a", task="add", max_steps=15, seed=1)
    b = sft([base_ckpt], tmp_path / "b", task="add", max_steps=15, seed=1)
    c = sft([base_ckpt], tmp_path / "c", task="add", max_steps=15, seed=2)
    assert a.manifest.content_hash == b.manifest.content_hash
    assert a.manifest.content_hash != c.manifest.content_hash


def test_continued_pretraining_on_plain_text_lowers_perplexity(full_sft, tmp_path):
    before = evaluate_checkpoint(full_sft, [])["perplexity"]
    ckpt = sft([full_sft], tmp_path / "cpt", dataset="builtin:prose", n_train=2000, max_steps=40)
    after = evaluate_checkpoint(ckpt, [])["perplexity"]
    assert after < before * 0.7, (before, after)


def test_user_jsonl_dataset_in_prompt_completion_format(base_ckpt, tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"double {i}"}],
            "completion": [{"role": "assistant", "content": str(2 * i)}],
        }
        for i in range(64)
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ckpt = sft([base_ckpt], tmp_path / "out", dataset=str(f), max_steps=4)
    assert ckpt.manifest.settings["dataset"] == str(f)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(PolmError, match="columns.*expected one of the TRL formats"):
        sft([base_ckpt], tmp_path / "bad", dataset=str(bad), max_steps=1)


def test_refuses_a_wrong_format_before_loading_weights(tmp_path):
    with staging(tmp_path / "gptq") as st:  # no weights at all: a load would fail differently
        (st.dir / "config.json").write_text("{}")
        fake = st.commit(stage="optimize.gptq", format="gptq")
    with pytest.raises(PolmError, match="align.sft expects a checkpoint of format 'hf'"):
        sft([Checkpoint.open(fake.path)], tmp_path / "out", task="add", max_steps=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_ddp_on_cpu(base_ckpt, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polm.cli",
            "align",
            "sft",
            "--from",
            str(base_ckpt.path),
            "--out",
            str(tmp_path / "ddp"),
            "--nproc",
            "2",
            "--set",
            "task=add",
            "--set",
            "max_steps=6",
            "--set",
            "per_device_train_batch_size=8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = Checkpoint.open(tmp_path / "ddp")
    # a step of 2 processes x 8 sequences: the trainer saw world size 2
    assert ckpt.manifest.metrics["train.world_size"] == 2
    assert evaluate_checkpoint(ckpt, ["add"], n=8)["eval.add.n"] == 8


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".parquet"])
def test_plain_text_csv_and_parquet_datasets(suffix, base_ckpt, tmp_path):
    import datasets

    f = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        f.write_text("\n".join(f"eve finds {i} keys." for i in range(64)))
        columns = ["text"]
    else:
        ds = datasets.Dataset.from_dict(
            {
                "prompt": [f"double {i}" for i in range(64)],
                "completion": [str(2 * i) for i in range(64)],
            }
        )
        ds.to_csv(f) if suffix == ".csv" else ds.to_parquet(f)
        columns = ["prompt", "completion"]
    from align.sft import build_dataset

    assert build_dataset(SFTSettings(dataset=str(f))).column_names == columns
    ckpt = sft([base_ckpt], tmp_path / "out", dataset=str(f), max_steps=2, packing=True)
    assert ckpt.manifest.metrics["train.steps"] == 2


@pytest.mark.gpu
def test_sft_on_gpu_writes_a_cpu_loadable_checkpoint(base_ckpt, tmp_path):
    ckpt = sft([base_ckpt], tmp_path / "gpu", task="add", max_steps=50)
    assert ckpt.manifest.metrics["train.last_loss"] < ckpt.manifest.metrics["train.first_loss"]
    model, _ = load_model(ckpt)  # loads on CPU
    assert next(model.parameters()).device.type == "cpu"


def test_loss_summary_with_fewer_steps_than_the_logging_interval(base_ckpt, tmp_path):
    # 3 steps with a loss logged every 50: the trainer logs step 1 (logging_first_step) and, at
    # the end, the run's average loss; the manifest's summary must carry exactly those values
    ckpt = sft([base_ckpt], tmp_path / "short", task="add", max_steps=3, logging_steps=50)
    m = ckpt.manifest.metrics
    log = json.loads((ckpt.path / "train_log.json").read_text())
    assert [(h["step"], h["loss"]) for h in log if "loss" in h] == [(1, m["train.first_loss"])]
    assert m["train.steps"] == 3 and log[-1]["step"] == 3
    assert m["train.final_avg_loss"] == log[-1]["train_loss"]
    # one logged loss: the last loss is the run's average, not step 1's loss again
    assert m["train.last_loss"] == m["train.final_avg_loss"]
    base_model, _ = load_model(base_ckpt)
    vocab = base_model.config.vocab_size
    for key in ("train.first_loss", "train.last_loss", "train.final_avg_loss"):
        # finite, and below a uniform guess's loss: the base model already predicts its data
        assert isinstance(m[key], float) and 0 < m[key] < math.log(vocab), (key, m[key])

    # the same seed with a loss logged at every step is the ground truth: same first loss, the
    # average is the mean of the three step losses and lies between them, the last is step 3's
    every = sft([base_ckpt], tmp_path / "every", task="add", max_steps=3, logging_steps=1)
    e = every.manifest.metrics
    steps = json.loads((every.path / "train_log.json").read_text())
    losses = [h["loss"] for h in steps if "loss" in h]
    assert [h["step"] for h in steps if "loss" in h] == [1, 2, 3]
    assert losses[0] == e["train.first_loss"] == m["train.first_loss"]
    assert e["train.last_loss"] == losses[-1]
    assert e["train.final_avg_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert m["train.final_avg_loss"] == pytest.approx(e["train.final_avg_loss"], rel=1e-6)
    assert min(losses) <= m["train.final_avg_loss"] <= max(losses)
    assert (
        m["train.trainable_params"]
        == e["train.trainable_params"]
        == sum(p.numel() for p in base_model.parameters())
    )  # a full fine-tune trains every parameter


def test_replay_mixes_the_share_asked_for_in_the_same_format():
    from align.sft import build_dataset

    ds = build_dataset(SFTSettings(task="add", n_train=300, replay="builtin:pretraining"))
    prompts = [r["messages"][0]["content"] for r in ds]
    replayed = sum(not p[0].isdigit() for p in prompts)  # reverse / pad chats, not sums
    assert len(ds) == 400 and replayed == 100
    with pytest.raises(PolmError, match="replay must be the same format"):
        build_dataset(SFTSettings(task="add", n_train=10, replay="builtin:prose"))


def test_self_replay_holds_the_model_to_its_own_answers_on_another_task(base_ckpt):
    from pydantic import ValidationError

    from align.sft import _greedy_answers, build_dataset
    from polm.tasks import get_task

    settings = SFTSettings(
        task="compare", n_train=30, replay=["builtin:pretraining", "self:add"], seed=1
    )
    model, tokenizer = load_model(base_ckpt)
    answer = lambda prompts: _greedy_answers(model, tokenizer, prompts)  # noqa: E731
    ds = build_dataset(settings, answer=answer)
    chats = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in ds}
    assert len(ds) == 40  # 30 task examples, a quarter replay split between the two sources
    own = [e.prompt for e in get_task("add").examples("train", 5)]
    assert set(own) <= set(chats)
    base_answers = [a.strip() for a in answer(own)]
    assert [chats[p] for p in own] == base_answers  # the base's answers, right or wrong
    assert sum(p.startswith(("reverse", "pad")) for p in chats) == 5
    with pytest.raises(ValidationError, match="unknown task 'nope'"):
        SFTSettings(task="add", replay="self:nope")
    with pytest.raises(PolmError, match="needs chat training data and the input model"):
        build_dataset(SFTSettings(task="add", n_train=4, replay="self:compare"))
