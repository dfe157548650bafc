"""The experiment runner: trial keys, the store, measured values against independent computations, resumption,
grids that grow, and pairs of every kind (zoo LM, DPO, vision, and two checkpoints of another architecture)."""

import copy
import json
import math

import pytest
import torch
from helpers import gpt2_pair

from unifieddelta import approx, deltas, experiments, kinds, losses
from unifieddelta.errors import CheckpointError, InvalidParameterError

ALL = ("term", "loss_change", "second_order", "scores")


@pytest.fixture(scope="module")
def lm():
    return experiments.pair("tiny-lm", smoke=True)


def test_keys_fill_defaults_and_ignore_the_seed_of_deterministic_edits(lm):
    a = experiments.trial(lm, "dare", {"p": 0.5}, 3)
    b = experiments.trial(lm, "dare", {"p": 0.5, "k": 0.0}, 3)
    assert a == b and a.key == b.key
    assert experiments.trial(lm, "dare", {"p": 0.5}, 4).key != a.key
    assert experiments.trial(lm, "bitdelta", {}, 7).seed == 0  # nothing drawn: one trial whatever the seed
    assert experiments.trial(lm, "bitdelta", {"magnitudes": "uniform"}, 7).seed == 7
    term5 = experiments.trial(lm, "dare", {"p": 0.5}, 3, measure=("term", "loss_change"))
    gauss = experiments.trial(lm, "dare", {"p": 0.5}, 3, measure=("term", "loss_change"), rule="gauss", points=2)
    assert term5.key == gauss.key  # the same edit
    assert term5.record_key("term") != gauss.record_key("term")  # measured differently
    assert term5.record_key("loss_change") == gauss.record_key("loss_change")  # not by the rule: shared
    assert experiments.pair("tiny-lm").identity() != lm.identity()  # the smoke recipe is another pair


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: experiments.trial(p, "daree", {}), "unknown method"),
        (lambda p: experiments.trial(p, "dare", {"q": 1}), "unknown parameter"),
        (lambda p: experiments.trial(p, "dare", {"p": 1.0}), r"p must be in \[0, 1\)"),
        (lambda p: experiments.trial(p, "low_rank", {"rank": -2}), "rank"),
        (lambda p: experiments.trial(p, "dare", {"p": 0.5}, measure=("term", "vibes")), "unknown quantity"),
        (lambda p: experiments.trial(p, "dare", {"p": 0.5}, rule="simpson"), "unknown rule"),
        (lambda p: experiments.trial(p, "dare", {"p": 0.5}, points=0), "points"),
        (lambda p: experiments.trial(p, "dare", {"p": 0.5}, mode="fd"), "unknown mode"),
    ],
)
def test_bad_trials_raise_before_anything_runs(lm, call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call(lm)


def test_bad_pairs_raise_clearly(tmp_path):
    with pytest.raises(InvalidParameterError, match="unknown zoo name"):
        experiments.pair("tiny-gpt")
    with pytest.raises(CheckpointError, match="no such folder"):
        experiments.pair(pre=str(tmp_path / "absent"), post=str(tmp_path / "absent2"))
    with pytest.raises(InvalidParameterError, match="both pre and post"):
        experiments.pair(pre=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        experiments.pair(pre=str(tmp_path / "file"), post=str(tmp_path))


def test_measured_values_match_independent_computations(lm, tmp_path):
    """The runner's term, exact change, second-order term and scores against the approx functions and lm-eval
    called directly, and the exact change against a model built by hand (W_post + α·ΔW)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifieddelta.evaluate import evaluate_lm

    ts = [
        experiments.trial(lm, "extrapolate", {"alpha": 0.5}, measure=ALL, limit=3),
        experiments.trial(lm, "dare", {"p": 0.3}, 1, measure=ALL, limit=3, rule="gauss", points=2),
    ]
    table = experiments.run(ts, store=tmp_path, progress=False, per_tensor=True)
    pre, post = lm.folders()
    model = AutoModelForCausalLM.from_pretrained(post).eval()
    tok = AutoTokenizer.from_pretrained(post)
    loss = kinds.KINDS["lm"].loss(experiments.Session(lm, "cpu", "float32", False), None)
    for t in ts:
        rows = table[table.trial == t.key].set_index("quantity")
        d = deltas.direction(pre, model, t.method, seed=t.seed, **t.params)
        res = approx.approximation_term(model, d, loss, points=t.points, rule=t.rule)
        assert rows.loc["term", "value"] == pytest.approx(res.term, rel=1e-9)
        tensor_terms = table[(table.trial == t.key) & (table.quantity == "tensor_term")]
        assert tensor_terms.value.sum() == pytest.approx(res.term, rel=1e-9)
        assert rows.loc["loss_change", "value"] == pytest.approx(approx.loss_change(model, d, loss), rel=1e-9)
        assert rows.loc["second_order", "value"] == pytest.approx(approx.second_order_term(model, d, loss), rel=1e-9)
        edited = copy.deepcopy(model)
        with torch.no_grad():
            for n, x in d.items():
                edited.get_parameter(n).add_(x)
        want = evaluate_lm(edited, tok, limit=3).set_index("task")["value"]
        got = experiments.scores(table[table.trial == t.key]).set_index("task")["value"]
        assert got.to_dict() == want.to_dict()
        norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in d.values()))
        assert rows.loc["d_norm", "value"] == pytest.approx(norm, rel=1e-12)
    # W_post + 0.5·ΔW by hand, from the two state dicts
    pre_model = AutoModelForCausalLM.from_pretrained(pre)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(by_hand.parameters(), pre_model.parameters()):
            p.add_(0.5 * (p - q))
        want = float(loss(by_hand)) - float(loss(model))
    ext = table[(table.trial == ts[0].key) & (table.quantity == "loss_change")].value.iloc[0]
    assert ext == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert "first_order" not in set(rows.index)  # Gauss-Legendre has no node at t = 0
    node0 = approx.approximation_term(model, deltas.direction(pre, model, "extrapolate", alpha=0.5), loss, points=1)
    first = table[(table.trial == ts[0].key) & (table.quantity == "first_order")].value.iloc[0]
    assert first == pytest.approx(node0.term, rel=1e-9)


def test_a_second_run_comes_from_the_store_and_a_grown_grid_computes_only_the_new(lm, tmp_path, monkeypatch):
    measured = []
    real = experiments._measure_trial
    monkeypatch.setattr(experiments, "_measure_trial", lambda s, t, q, st: (measured.append(t.key), real(s, t, q, st)))
    grid = experiments.grid(lm, "dare", {"p": [0.1, 0.5]}, seeds=[0, 1])
    first = experiments.run(grid, store=tmp_path, progress=False)
    assert len(measured) == 4
    again = experiments.run(grid, store=tmp_path, progress=False)
    assert len(measured) == 4  # everything from the store
    assert again.drop(columns="seconds").equals(first.drop(columns="seconds"))
    grown = experiments.grid(lm, "dare", {"p": [0.1, 0.5, 0.9]}, seeds=[0, 1])
    experiments.run(grown, store=tmp_path, progress=False)
    assert len(measured) == 6 and set(measured[4:]) == {t.key for t in grown[4:]}
    assert experiments.stored(grown, tmp_path) == (6, 6)
    # a new quantity of stored trials measures that quantity only
    with_scores = experiments.grid(lm, "dare", {"p": [0.1]}, seeds=[0], measure=("term", "scores"), limit=2)
    experiments.run(with_scores, store=tmp_path, progress=False)
    assert len(measured) == 7


def test_a_corrupt_record_is_measured_again(lm, tmp_path):
    t = experiments.trial(lm, "dare", {"p": 0.2})
    experiments.run([t], store=tmp_path, progress=False)
    store = experiments.Store(tmp_path)
    store.path(t.record_key("term")).write_text("{not json")
    assert store.path(t.record_key("term")).is_file() and store.get(t.record_key("term")) is None
    assert experiments.stored([t], store) == (0, 1)  # unreadable: not stored
    table = experiments.run([t], store=store, progress=False)
    assert "term" in set(table.quantity)


def test_references_are_pre_and_post(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    pre, post = lm.folders()
    table = experiments.run(experiments.references(lm, measure=("loss_change",)), store=tmp_path, progress=False)
    change = table[table.quantity == "loss_change"].set_index("edit")["value"]
    assert change["extrapolate(alpha=0.0)"] == 0.0
    loss = kinds.KINDS["lm"].loss(experiments.Session(lm, "cpu", "float32", False), None)
    with torch.no_grad():
        want = float(loss(AutoModelForCausalLM.from_pretrained(pre))) - float(
            loss(AutoModelForCausalLM.from_pretrained(post))
        )
    assert change["extrapolate(alpha=-1.0)"] == pytest.approx(want, rel=1e-4)


def test_product_biased_takes_the_gradient_of_the_pairs_loss(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    t = experiments.trial(lm, "product_biased", {"k": 0.5}, measure=("loss_change",))
    table = experiments.run([t], store=tmp_path, progress=False)
    pre, post = lm.folders()
    model = AutoModelForCausalLM.from_pretrained(post).eval()
    session = experiments.Session(lm, "cpu", "float32", False)
    loss = session.loss(None)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(model), list(params.values()))))
    d = deltas.direction(pre, model, "product_biased", grad=grads, k=0.5)
    assert table[table.quantity == "loss_change"].value.iloc[0] == pytest.approx(
        approx.loss_change(model, d, loss), rel=1e-6
    )


def test_dpo_and_vision_pairs(tmp_path):
    dpo = experiments.pair("tiny-lm-dpo", smoke=True)
    vit = experiments.pair("tiny-vit/rot90", smoke=True)
    assert dpo.kind == "dpo" and vit.kind == "vision"
    ts = [
        experiments.trial(dpo, "extrapolate", {"alpha": 0.5}, measure=ALL, limit=2, tasks=["ud_add", "preference"]),
        experiments.trial(vit, "dare", {"p": 0.5}, measure=ALL),
    ]
    table = experiments.run(ts, store=tmp_path, progress=False)
    s = experiments.scores(table)
    assert set(s[s.pair == dpo.name].task) == {"ud_add", "preference"} and set(s[s.pair == vit.name].task) == {"rot90"}
    assert s.value.between(0, 1).all()
    # every ViT tensor is edited (its names are converted on load; the pair must still match them all)
    session = experiments.Session(vit, "cpu", "float32", False)
    assert set(deltas.direction(session.pre, session.post, "dare", p=0.5)) == set(dict(session.post.named_parameters()))
    # the DPO term is on the DPO loss: the SFT model (pre) scores exactly log 2 on it
    from transformers import AutoModelForCausalLM

    session = experiments.Session(dpo, "cpu", "float32", False)
    with torch.no_grad():
        assert float(session.loss(None)(AutoModelForCausalLM.from_pretrained(dpo.folders()[0]))) == pytest.approx(
            math.log(2)
        )


def test_checkpoint_pair_of_another_architecture(tmp_path):
    """Two GPT-2 checkpoints with their own tokenizer: measured on the project's tasks and held-out answers."""
    gpt2_pair(tmp_path)
    pair = experiments.pair(pre=str(tmp_path / "pre"), post=str(tmp_path / "post"))
    assert pair.kind == "lm" and pair.identity()["pre"]["files"]
    t = experiments.trial(pair, "dare", {"p": 0.5}, measure=ALL, limit=2, tasks=["ud_add", "ud_parity"])
    table = experiments.run([t], store=tmp_path / "store", progress=False)
    assert set(table.quantity) >= {"term", "loss_change", "second_order", "score", "d_norm"}
    assert set(experiments.scores(table).task) == {"ud_add", "ud_parity"}
    # loss data the user names: a JSONL of prompt/answer records
    data = tmp_path / "loss.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(5))
    )
    named = experiments.pair(pre=str(tmp_path / "pre"), post=str(tmp_path / "post"), loss_data=str(data))
    assert named.identity() != pair.identity()
    out = experiments.run([experiments.trial(named, "dare", {"p": 0.5})], store=tmp_path / "store", progress=False)
    assert out[out.quantity == "term"].value.notna().all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no fields"}) + "\n")
    with pytest.raises(InvalidParameterError, match="record 0 needs"):
        experiments.run(
            [
                experiments.trial(
                    experiments.pair(pre=str(tmp_path / "pre"), post=str(tmp_path / "post"), loss_data=str(bad)),
                    "dare",
                    {"p": 0.5},
                )
            ],
            store=tmp_path / "store",
            progress=False,
        )


def test_shard_from_the_launchers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    assert experiments.parse_shard(None) is None
    assert experiments.parse_shard("1/4") == (1, 4)
    assert experiments.parse_shard("0/1") is None
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert experiments.parse_shard(None) == (2, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert experiments.parse_shard(None) == (1, 2)
    for bad in ("2/2", "a/b", "-1/3"):
        with pytest.raises(InvalidParameterError):
            experiments.parse_shard(bad)


def test_the_dpo_margins_and_loss_agree():
    from helpers import f64_llama, token_pairs

    model, ref = f64_llama(seed=0), f64_llama(seed=1)
    pairs = token_pairs(4)
    triples = [(p, a, list(reversed(a))) for p, a in pairs]
    loss = losses.dpo_loss(ref, triples, beta=1.0, batch_size=2)
    margins = losses.preference_margins(model, loss) - losses.preference_margins(ref, loss)
    want = float(torch.nn.functional.softplus(-margins).mean())
    with torch.no_grad():
        assert float(loss(model)) == pytest.approx(want, rel=1e-10)


def test_a_zoo_language_pair_takes_its_loss_on_some_of_its_tasks(lm, tmp_path):
    """``loss_data="task:…"``: the NLL of those tasks' held-out answers only, a pair of its own in the store. With
    the same examples per task, the six one-task losses weighted by their counts are the whole loss; unknown tasks and
    other kinds say what is accepted."""
    from transformers import AutoModelForCausalLM

    from unifieddelta.tasks import generate

    one = experiments.pair("tiny-lm", smoke=True, loss_data="task:ud_add")
    assert one.name == "tiny-lm (smoke) (loss: ud_add)" and one.identity() != lm.identity()
    model = AutoModelForCausalLM.from_pretrained(lm.folders()[1]).eval()

    def loss_of(p):
        return kinds.KINDS["lm"].loss(experiments.Session(p, "cpu", "float32", False), None)

    whole = loss_of(lm)
    parts = [loss_of(experiments.pair("tiny-lm", smoke=True, loss_data=f"task:{t}")) for t in generate.TASKS]
    assert sum(p.total for p in parts) == whole.total
    with torch.no_grad():
        weighted = sum(p.total * float(p(model)) for p in parts) / whole.total
        assert weighted == pytest.approx(float(whole(model)), rel=1e-5)
        assert len({round(float(p(model)), 6) for p in parts}) > 1  # the tasks' losses differ: each is its own data
    t = experiments.trial(one, "gaussian", {"sigma": 0.1}, measure=("term", "loss_change"))
    table = experiments.run([t], store=tmp_path, progress=False)
    assert set(table.pair) == {one.name} and table[table.quantity == "term"].value.notna().all()
    with pytest.raises(InvalidParameterError, match="unknown task"):
        experiments.pair("tiny-lm", smoke=True, loss_data="task:nope")
    with pytest.raises(InvalidParameterError, match="task:NAME"):
        experiments.pair("tiny-vit/rot90", smoke=True, loss_data="task:ud_add")


def test_per_question_scores_are_stored_and_average_to_the_scores(tmp_path):
    """Every scores record keeps each task's headline score on every question, for the language, DPO and vision
    kinds; the question table reads them back, and their mean is the score the tidy table reports."""
    dpo = experiments.pair("tiny-lm-dpo", smoke=True)
    vit = experiments.pair("tiny-vit/rot90", smoke=True)
    ts = [
        experiments.trial(
            dpo, "extrapolate", {"alpha": 0.0}, measure=("scores",), limit=3, tasks=["ud_add", "preference"]
        ),
        experiments.trial(vit, "dare", {"p": 0.5}, 1, measure=("scores",), limit=40),
    ]
    table = experiments.run(ts, store=tmp_path, progress=False)
    questions = experiments.question_table(ts, store=tmp_path)
    means = questions.groupby(["pair", "task"]).value.mean()
    heads = experiments.scores(table).set_index(["pair", "task"]).value
    assert set(means.index) == set(heads.index) == {(dpo.name, "ud_add"), (dpo.name, "preference"), (vit.name, "rot90")}
    for key, value in heads.items():
        assert means[key] == pytest.approx(value)
    assert questions.groupby(["pair", "task"]).size()[(vit.name, "rot90")] == 40
    assert questions.scoring.nunique() == 2 and set(questions.seed) == {0, 1}


def test_two_chapters_sharing_a_record_count_it_once(lm, tmp_path):
    a = experiments.trial(lm, "dare", {"p": 0.5}, measure=("term",))
    b = experiments.trial(lm, "dare", {"p": 0.5}, measure=("term", "loss_change"))  # the same term record
    assert a != b and a.record_key("term") == b.record_key("term")
    table = experiments.run([a, b], store=tmp_path, progress=False)
    assert (table.quantity == "term").sum() == 1 and (table.quantity == "loss_change").sum() == 1


def test_a_scope_is_part_of_the_key_only_when_it_is_not_the_default(lm):
    """Trials on every tensor keep the keys the store has always had (the hash of the same fields, computed here
    independently); a trial on the linear layers is another trial, labelled as such."""
    from unifieddelta import edits
    from unifieddelta.cache import stable_hash

    t = experiments.trial(lm, "bitdelta", {}, measure=("term",))
    fields = (
        "trial",
        experiments.STORE_VERSION,
        lm.identity(),
        "bitdelta",
        t.params_json,
        0,
        edits.spec("bitdelta").version,
    )
    assert t.key == stable_hash(*fields, None)
    linear = experiments.trial(lm, "bitdelta", {}, measure=("term",), scope="linear")
    assert linear.key != t.key and linear.label == "bitdelta() [linear]"
    with pytest.raises(InvalidParameterError, match="unknown scope 'inner'"):
        experiments.trial(lm, "bitdelta", {}, scope="inner")
