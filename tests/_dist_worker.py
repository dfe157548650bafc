"""Run under ``torchrun --nproc-per-node N``: compute the three quantities data-parallel, rank 0 writes them as JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from helpers import f64_llama, random_direction, token_pairs  # noqa: E402

from unifieddelta import approx, losses  # noqa: E402


def compute() -> dict:
    """The same numbers in one process or many: 5 batches, so 2 ranks get 3 and 2 of them."""
    model = f64_llama()
    d = random_direction(model, 0.01)
    loss = losses.causal_lm_nll(token_pairs(9), batch_size=2)
    grad = approx.approximation_term(model, d, loss, points=3, rule="left", mode="grad")
    fwd = approx.approximation_term(model, d, loss, points=2, rule="gauss", mode="jvp")
    return {
        "term": grad.term,
        "per_tensor": grad.per_tensor,
        "values": grad.values,
        "losses": grad.losses,
        "forward_passes": grad.forward_passes,
        "jvp_term": fwd.term,
        "loss_change": approx.loss_change(model, d, loss),
        "second_order": approx.second_order_term(model, d, loss),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = compute()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()
