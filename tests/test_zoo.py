"""The zoo's machinery on tiny recipes (seconds): pipeline end to end, cache hits, corruption, bad names."""

import os

import pytest
import torch
from safetensors.torch import load_file

from unifieddelta import zoo
from unifieddelta.cli import main
from unifieddelta.errors import InvalidParameterError
from unifieddelta.zoo import LMRecipe, ViTRecipe, load_pair

TINY_LM, TINY_VIT = zoo.SMOKE_LM, zoo.SMOKE_VIT  # the recipes the notebooks' smoke runs use too


def _weights(folder):
    # Cloned: safetensors maps the file, and the corruption test truncates it in place.
    return {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}


def test_lm_pipeline_end_to_end_then_cache_hit(monkeypatch):
    pre, sft = load_pair("tiny-lm", recipe=TINY_LM)
    sft2, dpo = load_pair("tiny-lm-dpo", recipe=TINY_LM)
    assert sft2 == sft  # the DPO pair starts where the SFT pair ends
    for folder in (pre, sft, dpo):
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    w_pre, w_sft, w_dpo = _weights(pre), _weights(sft), _weights(dpo)
    assert w_pre.keys() == w_sft.keys() == w_dpo.keys()
    assert any(not torch.equal(w_pre[k], w_sft[k]) for k in w_pre)
    assert any(not torch.equal(w_sft[k], w_dpo[k]) for k in w_sft)

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    for stage in ("_pretrain", "_sft", "_dpo"):
        monkeypatch.setattr(zoo.lm, stage, no_training)
    assert load_pair("tiny-lm-dpo", recipe=TINY_LM) == (sft, dpo)
    assert load_pair("tiny-lm", recipe=TINY_LM) == (pre, sft)
    monkeypatch.undo()

    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(dpo)
    tok = AutoTokenizer.from_pretrained(dpo)
    ids = tok("Question: What is 12 + 7?\nAnswer: 19", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert tok.decode(ids[0]) == "Question: What is 12 + 7?\nAnswer: 19"


def test_pretraining_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    from unifieddelta.zoo import lm

    recipe = LMRecipe(width=16, layers=1, heads=2, seq_len=32, pre_docs=100, pre_steps=5, pre_batch=4)
    first = _weights(lm.build(recipe, "pre"))
    monkeypatch.setenv("UNIFIEDDELTA_CACHE", str(tmp_path))
    second_dir = lm.build(recipe, "pre")
    assert str(second_dir).startswith(str(tmp_path))
    second = _weights(second_dir)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_recipe_change_rebuilds_only_later_stages():
    gentler = LMRecipe(**{**TINY_LM.__dict__, "sft_lr": TINY_LM.sft_lr / 2})
    assert gentler.key("pre") == TINY_LM.key("pre")
    assert gentler.key("sft") != TINY_LM.key("sft")
    assert gentler.key("dpo") != TINY_LM.key("dpo")
    assert LMRecipe(**{**TINY_LM.__dict__, "dpo_beta": 0.5}).key("sft") == TINY_LM.key("sft")


def test_fields_added_later_keep_old_keys_until_changed():
    # init_std / pre_task were added after caches were built: at their old value they are not hashed.
    from unifieddelta.zoo.recipes import recipe_fields as _fields

    base = {k: v for k, v in TINY_LM.__dict__.items() if k != "init_std"}
    assert "init_std" not in _fields(LMRecipe(**base, init_std=0.02), ("",))
    assert _fields(LMRecipe(**base, init_std=0.05), ("",))["init_std"] == 0.05
    keys = {LMRecipe(**base, init_std=s).key("pre") for s in (0.02, 0.05, 0.06)}
    assert len(keys) == 3
    other = {k: v for k, v in TINY_VIT.__dict__.items() if k != "pre_task"}
    assert ViTRecipe(**other, pre_task="rotation").key("pre") != TINY_VIT.key("pre")
    other = {k: v for k, v in TINY_VIT.__dict__.items() if k != "init_std"}
    assert ViTRecipe(**other, init_std=0.02).key("pre") == ViTRecipe(**other).key("pre")
    assert ViTRecipe(**other, init_std=0.06).key("pre") != ViTRecipe(**other).key("pre")


def test_init_std_reaches_the_model():
    from unifieddelta.zoo import lm

    recipe = LMRecipe(width=16, layers=1, heads=2, init_std=0.3)
    tok = lm.train_tokenizer(["Question: What is 1 + 2?\nAnswer: 3"] * 4, 300)
    model = lm.new_model(recipe, tok)
    assert model.config.initializer_range == 0.3
    assert 0.2 < model.model.layers[0].mlp.up_proj.weight.std().item() < 0.4
    from unifieddelta.zoo import vit

    model = vit.new_model(ViTRecipe(width=16, layers=1, heads=2, init_std=0.3))
    assert model.config.initializer_range == 0.3
    stds = [w.std().item() for n, w in model.named_parameters() if w.ndim == 2 and "embeddings" not in n]
    assert stds and all(0.2 < s < 0.4 for s in stds)


def test_corrupted_entry_is_detected_and_rebuilt():
    pre, sft = load_pair("tiny-lm", recipe=TINY_LM)
    good = _weights(sft)
    target = sft / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])  # truncated, as after a crash or a full disk
    with pytest.warns(RuntimeWarning, match="corrupted"):
        pre2, sft2 = load_pair("tiny-lm", recipe=TINY_LM)
    assert (pre2, sft2) == (pre, sft)
    rebuilt = _weights(sft2)
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # the same size: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["byte flip", "deleted file", "garbled manifest"])
def test_every_kind_of_damage_is_detected_and_rebuilt(damage):
    pre, sft = load_pair("tiny-lm", recipe=TINY_LM)
    good = _weights(sft)
    if damage == "byte flip":
        _flip_one_byte(sft / "model.safetensors")
    elif damage == "deleted file":
        (sft / "tokenizer.json").unlink()
    else:
        (sft / "zoo.json").write_text('{"files": {"model.safetensors": ')
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert load_pair("tiny-lm", recipe=TINY_LM) == (pre, sft)
    assert (sft / "tokenizer.json").is_file()
    rebuilt = _weights(sft)
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)


def test_a_corrupted_parent_entry_is_rebuilt_under_its_child():
    """The pre-trained model under the SFT -> DPO pair: asking for the DPO pair checks (and rebuilds) its ancestors."""
    pre, sft = load_pair("tiny-lm", recipe=TINY_LM)
    load_pair("tiny-lm-dpo", recipe=TINY_LM)
    good = _weights(pre)
    _flip_one_byte(pre / "model.safetensors")
    with pytest.warns(RuntimeWarning, match="corrupted"):
        load_pair("tiny-lm-dpo", recipe=TINY_LM)
    rebuilt = _weights(pre)
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)


def test_training_does_what_it_is_for():
    """SFT lowers the held-out answer NLL, DPO widens log π(chosen) − log π(rejected) on its pairs (even the smoke
    recipe's few steps), and a ViT fine-tune beats its linear probe on its own task (a recipe a little longer than
    the smoke one: the smoke fine-tune is too short to learn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unifieddelta import kinds, losses
    from unifieddelta.tasks import generate

    pre, sft = load_pair("tiny-lm", recipe=TINY_LM)
    dpo = load_pair("tiny-lm-dpo", recipe=TINY_LM)[1]
    tok = AutoTokenizer.from_pretrained(sft)
    m_pre, m_sft, m_dpo = (AutoModelForCausalLM.from_pretrained(f).eval() for f in (pre, sft, dpo))
    nll = losses.causal_lm_nll(kinds._project_pairs(tok, 8), batch_size=8)
    with torch.no_grad():
        assert float(nll(m_sft)) < float(nll(m_pre))
    r = TINY_LM
    pairs = generate.preference_pairs(r.dpo_pairs, seed=r.seed, n_test=r.n_test)
    dpo_loss = losses.dpo_loss(m_sft, [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], tok, beta=r.dpo_beta)
    assert float(losses.preference_margins(m_dpo, dpo_loss).mean()) > float(
        losses.preference_margins(m_sft, dpo_loss).mean()
    )
    learns = ViTRecipe(width=16, layers=1, heads=2, pre_steps=60, pre_batch=32, ft_steps=60, ft_batch=32, ft_lr=2e-3)
    load_pair("tiny-vit/rot90", recipe=learns)
    metrics = zoo.describe("tiny-vit/rot90", recipe=learns)["metrics"]
    assert metrics["post_accuracy"] > metrics["pre_accuracy"] + 0.02, metrics


def test_vit_pair_end_to_end():
    from transformers import ViTForImageClassification

    from unifieddelta.evaluate import evaluate_vision

    pre, post = load_pair("tiny-vit/rot90", recipe=TINY_VIT)
    m_pre = ViTForImageClassification.from_pretrained(pre)
    m_post = ViTForImageClassification.from_pretrained(post)
    assert m_pre.state_dict().keys() == m_post.state_dict().keys()
    assert load_pair("tiny-vit/rot90", recipe=TINY_VIT) == (pre, post)
    with pytest.raises(InvalidParameterError, match="unknown vision task"):
        evaluate_vision(m_post, "rot45")


def test_vit_backbone_pretrained_on_rotations():
    from unifieddelta.tasks import digits

    recipe = ViTRecipe(**{**TINY_VIT.__dict__, "pre_task": "rotation"})
    x, y = digits.pretrain_data(recipe.pre_task, image_size=recipe.image_size)
    assert set(y.tolist()) == {0, 1, 2, 3} and len(x) == 4 * len(digits.task_data("digits", split="train")[1])
    pre, post = load_pair("tiny-vit/noise", recipe=recipe)
    assert pre.parent != load_pair("tiny-vit/noise", recipe=TINY_VIT)[0].parent
    with pytest.raises(InvalidParameterError, match="pre-training task"):
        load_pair("tiny-vit/noise", recipe=ViTRecipe(**{**TINY_VIT.__dict__, "pre_task": "jigsaw"}))


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-lm/7", "tiny-lm/wide", "tiny-vit/rot45", "tiny-vit", ""])
def test_unknown_names_are_clear_errors(name):
    with pytest.raises(InvalidParameterError, match="unknown"):
        load_pair(name)


def test_wrong_recipe_kind_is_an_error():
    with pytest.raises(InvalidParameterError, match="ViTRecipe"):
        load_pair("tiny-vit/rot90", recipe=TINY_LM)


def test_names_and_cli(capsys):
    assert {"tiny-lm", "tiny-lm-dpo"} <= set(zoo.names())
    assert sum(n.startswith("tiny-vit/") for n in zoo.names()) >= 4
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-lm-dpo" in out and "tiny-vit/rot90" in out
    assert main(["zoo", "build", "tiny-nothing"]) == 2
    assert "unknown zoo name" in capsys.readouterr().err


def test_no_stray_files_after_a_failed_build(monkeypatch):
    from unifieddelta.cache import cache_dir
    from unifieddelta.zoo import lm

    recipe = LMRecipe(width=16, layers=1, heads=2, seq_len=32, pre_docs=50, pre_steps=1, pre_batch=4, seed=99)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm, "_pretrain", boom)
    with pytest.raises(RuntimeError):
        lm.build(recipe, "pre")
    assert not [p for p in os.listdir(cache_dir("zoo")) if recipe.key("pre") in p]


def test_a_name_may_carry_recipe_changes():
    recipe = zoo.recipe_for("tiny-lm[sft_lr=5e-5,sft_steps=300]")
    assert recipe.sft_lr == 5e-5 and isinstance(recipe.sft_lr, float) and recipe.sft_steps == 300
    assert recipe.key("pre") == zoo.recipe_for("tiny-lm").key("pre") and recipe.key("sft") != zoo.recipe_for(
        "tiny-lm"
    ).key("sft")
    assert (
        zoo.recipe_for("tiny-lm/128[sft_lr=1]").width == 128 and zoo.recipe_for("tiny-lm/128[sft_lr=1]").sft_lr == 1.0
    )
    assert zoo.recipe_for("tiny-vit/rot90[ft_lr=1e-4]").ft_lr == 1e-4
    for bad, match in [
        ("tiny-lm[sft_rate=1]", "no field 'sft_rate'"),
        ("tiny-lm[sft_lr]", "KEY=VALUE"),
        ("tiny-lm[width=wide]", "expected a int"),
        ("tiny-lm[sft_lr=1", "NAME\\[FIELD=VALUE"),
        ("tiny-gpt[sft_lr=1]", "unknown zoo name"),
    ]:
        with pytest.raises(InvalidParameterError, match=match):
            zoo.recipe_for(bad)


def test_a_named_variant_builds_its_own_entry(monkeypatch):
    name = (
        "tiny-lm["
        + ",".join(
            f"{k}={v}"
            for k, v in TINY_LM.__dict__.items()
            if k != "_LATER" and v != getattr(zoo.recipe_for("tiny-lm"), k)
        )
        + ",sft_lr=5e-5]"
    )
    pre, post = load_pair(name)
    base_pre, base_post = load_pair("tiny-lm", recipe=TINY_LM)
    assert pre == base_pre and post != base_post  # the same pre-training, another SFT
    assert zoo.describe(name)["built"]
