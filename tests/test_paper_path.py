"""The paper profile's path on checkpoint pairs: an SFT -> DPO pair of checkpoints with preference data (EXPO on
Zephyr), the loss-data specs it names, models placed with a device map, and profiles that extend others."""

import json

import pytest
import torch
from helpers import gpt2_pair

from unifieddelta import chapters, estimates, experiments, kinds, pipeline
from unifieddelta.errors import InvalidParameterError, ProfileError

ALL = ("term", "loss_change", "second_order", "scores")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_pair(tmp_path_factory.mktemp("gpt2"))


def _preferences(path, chat: bool):
    rows = []
    for i in range(5):
        q, good, bad = f"What is {i} + 1?", str(i + 1), f"{i + 7} or so"
        if chat:  # UltraFeedback's shape: the conversation, ending in the answer, on each side
            rows.append(
                {
                    "prompt": q,
                    "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                    "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
                }
            )
        else:
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sequence_logp(model, tok, prompt: str, answer: str) -> float:
    """log π(answer | prompt) by a loop over the answer's tokens, one unpadded sequence, float64 log-softmax."""
    ids_p = tok(prompt)["input_ids"]
    ids_a = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids_p + ids_a])).logits.double()[0], -1)
    return sum(float(lp[len(ids_p) + j - 1, a]) for j, a in enumerate(ids_a))


def test_a_dpo_pair_of_checkpoints_takes_the_dpo_loss_on_its_preference_data(gpt2, tmp_path):
    pre, post = gpt2
    data = _preferences(tmp_path / "prefs.jsonl", chat=False)
    p = experiments.pair(pre=str(pre), post=str(post), kind="dpo", loss_data=str(data), dpo_beta=0.5)
    assert p.kind == "dpo" and p.identity()["dpo_beta"] == 0.5 and "(loss: prefs.jsonl)" in p.name
    default = experiments.pair(pre=str(pre), post=str(post), kind="dpo", loss_data=str(data))
    assert default.dpo_beta == kinds.DPO_BETA and default.identity() != p.identity()
    session = experiments.Session(p, "cpu", "float32", False)
    tok = kinds._tokenizer(session)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    margins, ref_margins = [], []
    for r in records:
        lp = {
            (m, side): _sequence_logp(model, tok, r["prompt"], " " + r[side])
            for m, model in (("post", session.post), ("ref", session.pre))
            for side in ("chosen", "rejected")
        }
        margins.append(lp["post", "chosen"] - lp["post", "rejected"])
        ref_margins.append(lp["ref", "chosen"] - lp["ref", "rejected"])
    margin = torch.tensor(margins, dtype=torch.float64) - torch.tensor(ref_margins, dtype=torch.float64)
    want = float(torch.nn.functional.softplus(-0.5 * margin).mean())  # −log σ(β m), the SFT model the reference
    with torch.no_grad():
        assert float(session.loss(None)(session.post)) == pytest.approx(want, rel=1e-4)
        assert float(session.loss(None)(session.pre)) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)
    # the EXPO chapter on it: term, exact change and scores, the preference accuracy among them
    t = experiments.trial(p, "extrapolate", {"alpha": 0.5}, measure=ALL, limit=2, tasks=["ud_add", "preference"])
    table = experiments.run([t], store=tmp_path / "store", progress=False)
    assert table[table.quantity.isin(["term", "loss_change"])].value.notna().all()
    edited = experiments.Session(p, "cpu", "float32", False).post
    with torch.no_grad():
        for w, w0 in zip(edited.parameters(), session.pre.parameters()):
            w.add_(0.5 * (w - w0))  # W_post + 0.5 ΔW
    shares = [
        _sequence_logp(edited, tok, r["prompt"], " " + r["chosen"])
        > _sequence_logp(edited, tok, r["prompt"], " " + r["rejected"])
        for r in records
    ]
    s = experiments.scores(table)
    assert s[s.task == "preference"].value.iloc[0] == pytest.approx(sum(shares) / len(shares))


def test_preference_records_in_ultrafeedbacks_chat_shape(gpt2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2[1])
    data = _preferences(tmp_path / "chat.jsonl", chat=True)
    plain = kinds._named_triples(str(data), None, tok)  # no chat template: the prompt field
    assert plain[0] == ("What is 0 + 1?", " 1", " 7 or so")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    templated = kinds._named_triples(str(data), 2, tok)
    assert templated == [
        ("<|user|>What is 0 + 1?<|assistant|>", " 1", " 7 or so"),
        ("<|user|>What is 1 + 1?<|assistant|>", " 2", " 8 or so"),
    ]


def test_bad_dpo_pairs_and_preference_data_say_what_is_wrong(gpt2, tmp_path):
    pre, post = map(str, gpt2)
    with pytest.raises(InvalidParameterError, match="needs loss_data"):
        experiments.pair(pre=pre, post=post, kind="dpo")
    with pytest.raises(InvalidParameterError, match="dpo_beta must be > 0"):
        experiments.pair(pre=pre, post=post, kind="dpo", loss_data=str(tmp_path), dpo_beta=0)
    with pytest.raises(InvalidParameterError, match="recipe"):
        experiments.pair("tiny-lm-dpo", smoke=True, dpo_beta=0.1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(InvalidParameterError, match="record 0 needs a preference triple"):
        kinds._named_triples(str(bad), None, None)


def test_loss_data_specs(tmp_path):
    assert kinds.hf_spec("hf:openai/gsm8k:main:test") == ("openai/gsm8k", "main", "test")
    assert kinds.hf_spec("hf:tatsu-lab/alpaca:train[:1319]") == ("tatsu-lab/alpaca", None, "train[:1319]")
    assert kinds.hf_spec("hf:HuggingFaceH4/ultrafeedback_binarized:test_prefs")[2] == "test_prefs"
    assert kinds.hf_spec("hf:owner/name") == ("owner/name", None, "test")
    with pytest.raises(InvalidParameterError, match="expected hf:NAME"):
        kinds.hf_spec("hf:a:b:c:d")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
        + "\n"
        + json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
        + "\n"
    )
    assert kinds._named_pairs(str(alpaca), None) == [
        (kinds._question_prompt("Add the numbers.\n2 and 3"), " 5"),
        (kinds._question_prompt("Say hi."), " hi"),
    ]


def test_device_auto_places_the_models_with_a_device_map(gpt2, tmp_path):
    """``device="auto"``: accelerate's device map (here every tensor on the CPU, the only device), the same term as
    the model moved whole; pre takes post's map, so each pair of tensors shares a device."""
    p = experiments.pair(pre=str(gpt2[0]), post=str(gpt2[1]))
    trials = [
        experiments.trial(p, "dare", {"p": 0.5}, device=d, measure=("term", "loss_change")) for d in ("auto", "cpu")
    ]
    table = experiments.run(trials, store=tmp_path, progress=False)
    by_device = table[table.quantity == "term"].value.to_numpy()
    assert len(by_device) == 2 and by_device[0] == pytest.approx(by_device[1], rel=1e-6)

    class Placed:
        hf_device_map = {"transformer.h.0": 0, "transformer.h.1": 1, "lm_head": "cpu"}

    assert kinds._placement("auto", like=Placed()) == {"device_map": Placed.hf_device_map}
    assert kinds._placement("balanced") == {"device_map": "balanced"}
    assert kinds._placement("cuda:0") == {}


def test_the_paper_profiles_extend_one_another(tmp_path):
    paper, mistral = pipeline.load_profile("paper"), pipeline.load_profile("paper-mistral")
    assert mistral["name"] == "paper-mistral" and mistral["notebooks"] == paper["notebooks"]
    assert mistral["defaults"] == {
        **paper["defaults"],
        "pre": "mistralai/Mistral-7B-v0.3",
        "post": "mistralai/Mistral-7B-Instruct-v0.3",
    }
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ProfileError, match="circle"):
        pipeline.load_profile(tmp_path / "a.yaml")
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: paper\ndefaults:\n  device: auto\nnotebooks:\n  - name: dare\n")
    loaded = pipeline.load_profile(mine)
    assert loaded["name"] == "mine" and loaded["defaults"]["device"] == "auto" and len(loaded["notebooks"]) == 1


def test_the_paper_profile_runs_expo_on_zephyr_and_estimates_its_cost():
    runs = {r.name: r for r in pipeline.notebook_runs(pipeline.load_profile("paper"), pipeline.find_root())}
    expo = chapters.plan("expo", **runs["expo"].resolved)
    dpo = expo.pairs[0]
    assert (dpo.kind, dpo.pre, dpo.post, dpo.dpo_beta) == (
        "dpo",
        "alignment-handbook/zephyr-7b-sft-full",
        "alignment-handbook/zephyr-7b-dpo-full",
        0.01,
    )
    t = next(t for t in expo.trials if t.pair == dpo)
    assert t.loss_examples == 512 and t.device == "cuda" and t.dtype == "bfloat16"
    # 5 points x 6 FLOPs x 7.24e9 parameters x 512 triples x 900 tokens at the assumed throughput
    assert estimates.trial_term_seconds(t) == pytest.approx(5 * 6 * 7.24e9 * 512 * 900 / estimates.ASSUMED_FLOPS)
    cost = estimates.estimate(expo)
    assert cost["memory"] == pytest.approx(5 * 2 * 8.03e9) and cost["gpus"] == 2
    minilm = chapters.plan("minilm", **runs["minilm"].resolved)
    assert minilm.pairs[0].name == "minilm-sre"  # the packaged pair, not the profile's
    predicts = chapters.plan("predicts", **runs["predicts"].resolved)
    assert any(p.loss_data == "hf:tatsu-lab/alpaca:train[:1319]" for p in predicts.pairs)


def test_sweep_takes_a_dpo_pair_of_checkpoints(gpt2, tmp_path, capsys):
    from unifieddelta.cli import build_parser, main

    choices = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["sweep"]._actions if a.dest == "kind"
    ).choices
    assert sorted(choices) == sorted(kinds.KINDS)
    data = _preferences(tmp_path / "prefs.jsonl", chat=False)
    csv = tmp_path / "out.csv"
    assert (
        main(
            [
                "sweep",
                "--pre",
                str(gpt2[0]),
                "--post",
                str(gpt2[1]),
                "--kind",
                "dpo",
                "--loss-data",
                str(data),
                "--dpo-beta",
                "0.5",
                "--method",
                "extrapolate",
                "--grid",
                "alpha=0.5",
                "--store",
                str(tmp_path / "s"),
                "--csv",
                str(csv),
            ]
        )
        == 0
    )
    import pandas as pd

    table = pd.read_csv(csv)
    assert table[table.quantity == "term"].value.notna().all() and "(loss: prefs.jsonl)" in table.pair.iloc[0]
