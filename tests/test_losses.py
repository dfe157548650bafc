"""Loss callables: what they compute, that batching does not change it, and the Figure-3 table built on them."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import f64_llama, token_pairs
from torch import nn

from unifieddelta import losses
from unifieddelta.errors import InvalidParameterError


@pytest.fixture(scope="module")
def model():
    return f64_llama()


def manual_nll(model, pairs):
    """Mean NLL over answer tokens, one sequence at a time, with nothing but log_softmax."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j in range(len(prompt), len(prompt) + len(answer)):
                total -= float(logp[j - 1, ids[0, j]])
                count += 1
    return total / count


def test_causal_lm_nll_masks_prompt_and_ignores_batching(model):
    pairs = token_pairs(5)
    want = manual_nll(model, pairs)
    with torch.no_grad():
        for bs in (1, 2, 5):
            loss = losses.causal_lm_nll(pairs, batch_size=bs)
            assert len(loss.parts()) == math.ceil(5 / bs)
            assert float(loss(model)) == pytest.approx(want, rel=1e-12)
            assert math.fsum(float(p(model)) for p in loss.parts()) == pytest.approx(want, rel=1e-12)


class CharTokenizer:
    """Enough of a Hugging Face tokenizer for the tests: one id per character, BOS = 1, PAD = 0."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 60 for c in text]}


def test_causal_lm_nll_on_text_and_truncation(model):
    tok = CharTokenizer()
    loss = losses.causal_lm_nll([("2+2=", "4"), ("3+4=", "7!")], tok, batch_size=2)
    ids = [
        ([1] + [3 + ord(c) % 60 for c in p], [3 + ord(c) % 60 for c in a]) for p, a in [("2+2=", "4"), ("3+4=", "7!")]
    ]
    with torch.no_grad():
        assert float(loss(model)) == pytest.approx(manual_nll(model, ids), rel=1e-12)
    cut = losses.causal_lm_nll([(list(range(3, 20)), [5, 6])], max_length=6)  # keeps the last 6 tokens
    assert cut.batches[0]["input_ids"].tolist() == [[16, 17, 18, 19, 5, 6]]
    with pytest.raises(InvalidParameterError, match="tokenizer"):
        losses.causal_lm_nll([("a", "b")])
    with pytest.raises(InvalidParameterError, match="no answer"):
        losses.causal_lm_nll([([3, 4], [])])
    with pytest.raises(InvalidParameterError, match="batch_size"):
        losses.causal_lm_nll(token_pairs(2), batch_size=0)
    with pytest.raises(InvalidParameterError, match="no data"):
        losses.causal_lm_nll([])


def test_classification_ce():
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    want = float(F.cross_entropy(net(x), y))
    for bs in (2, 7):
        loss = losses.classification_ce(x, y, batch_size=bs, input_name=None)
        assert float(loss(net)) == pytest.approx(want, rel=1e-12)
    with pytest.raises(InvalidParameterError, match="labels"):
        losses.classification_ce(x, y[:3])


def test_dpo_loss(model):
    triples = [(p, a, a[::-1] + [7]) for p, a in token_pairs(4)]
    same = losses.dpo_loss(copy.deepcopy(model), triples, beta=0.5, batch_size=3)
    with torch.no_grad():
        assert float(same(model)) == pytest.approx(math.log(2), rel=1e-12)  # π = π_ref: every margin is zero
    other = f64_llama(seed=1)
    loss = losses.dpo_loss(other, triples, beta=0.5, batch_size=3)

    def seq_logp(m, prompt, answer):
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)
        return sum(float(logp[j - 1, ids[0, j]]) for j in range(len(prompt), ids.shape[1]))

    with torch.no_grad():
        want = 0.0
        for p, c, r in triples:
            margin = (seq_logp(model, p, c) - seq_logp(other, p, c)) - (seq_logp(model, p, r) - seq_logp(other, p, r))
            want += -math.log(1 / (1 + math.exp(-0.5 * margin)))
        assert float(loss(model)) == pytest.approx(want / len(triples), rel=1e-10)
    with pytest.raises(InvalidParameterError, match="beta"):
        losses.dpo_loss(other, triples, beta=0)


def test_answer_logprobs_project_only_the_answers_yet_match_the_whole_sequence():
    """The output layer at the labelled positions only (Llama, GPT-2) gives the log-probabilities and the gradients
    of the whole-sequence path, which any other architecture takes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).double().eval()
    for net in (f64_llama(), gpt2):
        assert net.config.model_type in losses.HEAD_APART
        batch = losses.pad_rows([losses.encode_pair(p, a, None, None) for p, a in token_pairs(5)], 0)
        fast = losses.answer_logprobs(net, batch, chunk=2)
        whole = losses.token_logprobs(net, batch)[0].sum(-1)
        torch.testing.assert_close(fast, whole, rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad(v.sum(), list(net.parameters()), allow_unused=True) for v in (fast, whole)]
        for g_fast, g_whole in zip(*grads):
            if g_whole is not None:
                torch.testing.assert_close(g_fast, g_whole, rtol=1e-10, atol=1e-12)
