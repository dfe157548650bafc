"""The ``unifieddelta`` command. Each sub-command is a small function that parses, calls the module, reports.

Errors of the project (``UnifiedDeltaError``) are printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import InvalidParameterError, UnifiedDeltaError
from .settings import parse_settings


def _book(args: argparse.Namespace) -> int:
    from .pipeline import build_book, dry_run

    if args.compare_glue:
        from .page import glue_diff

        old, new = args.compare_glue
        differences = glue_diff(old, new)
        print("\n".join(differences) or f"every value glued in {old} is glued identically in {new}")
        return 1 if differences else 0
    if args.dry_run:
        print(dry_run(profile=args.profile, root=args.root, store=args.store))
        return 0
    index = build_book(profile=args.profile, only=args.only, root=args.root, force=args.force)
    print(f"book built: {index}")
    return 0


def _add_book(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("book", help="execute the profile's notebooks (cached) and build the Jupyter Book")
    p.add_argument("--profile", default="tiny", help="a shipped profile name (tiny, paper) or a YAML file")
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="execute only these notebooks of the profile")
    p.add_argument("--root", default=None, help="the book's root folder (default: found from the current folder)")
    p.add_argument("--force", action="store_true", help="execute notebooks even when the cache has them")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the notebooks, their parameters, pairs and trials (stored / to compute); run nothing",
    )
    p.add_argument("--store", default=None, help="the experiment store to count trials in (default: the cache's)")
    p.add_argument(
        "--compare-glue",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="compare every glued value of two folders of executed notebooks (book/generated of two builds); "
        "exit 1 if any differs",
    )
    p.set_defaults(func=_book)


def _add_pair_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--pre", required=required, help="pre-trained checkpoint: a local Hugging Face folder or a hub id")
    p.add_argument("--post", required=required, help="post-trained checkpoint: a local Hugging Face folder or a hub id")


def _warn_lines(caught) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _edit(args: argparse.Namespace) -> int:
    import os
    import warnings

    # Before torch loads: its CPU allocator then asks for transparent huge pages for large tensors. Each fresh
    # tensor otherwise costs a page fault per 4 KiB, which took longer than the arithmetic of the edit itself.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from .deltas import apply_edit

    params = parse_settings(args.set)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = apply_edit(
            args.pre,
            args.post,
            args.method,
            seed=args.seed,
            include=args.include,
            exclude=args.exclude,
            preset=args.preset,
            out=args.out,
            overwrite=args.overwrite,
            progress=True,
            compute_dtype=getattr(torch, args.compute_dtype),
            **params,
        )
    _warn_lines(caught)
    print(f"edited checkpoint: {out}")
    return 0


def _add_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="write the checkpoint W_pre + F(W_post - W_pre), shard by shard")
    _add_pair_args(p, required=True)
    p.add_argument(
        "--method", required=True, help="dare, drop_only, bitdelta, low_rank, magnitude_trim, extrapolate, sign_biased"
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a setting of the method (repeatable), e.g. p=0.9"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random edits (per tensor: seed and tensor name)")
    p.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--include", action="append", metavar="REGEX", help="edit only tensors whose name matches")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="leave tensors whose name matches as in post")
    p.add_argument(
        "--preset", default="all", help="all (default), matrices (2-D only), linear (no embeddings/norms/heads)"
    )
    p.add_argument(
        "--compute-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="precision of the edit arithmetic (float32: half the memory and time, identity edits still exact)",
    )
    p.set_defaults(func=_edit)


def _stats(args: argparse.Namespace) -> int:
    import warnings

    from .cache import atomic_write_bytes
    from .deltas import delta_stats

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = delta_stats(
            args.pre, args.post, include=args.include, exclude=args.exclude, preset=args.preset, progress=True
        )
    _warn_lines(caught)
    if args.csv:
        atomic_write_bytes(args.csv, table.to_csv(index=False).encode())
    if table.empty:
        print("no tensor selected")
        return 0
    # Names left-aligned, numbers right-aligned.
    names = ["name", *table["name"]]
    width = max(map(len, names))
    body = table.drop(columns="name").to_string(index=False, float_format=lambda x: f"{x:.4g}").splitlines()
    print("\n".join(f"{n:<{width}}  {b}" for n, b in zip(names, body)))
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="per-tensor statistics of the delta W_post - W_pre")
    _add_pair_args(p, required=True)
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--include", action="append", metavar="REGEX", help="only tensors whose name matches")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="skip tensors whose name matches")
    p.add_argument("--preset", default="all", help="all (default), matrices, linear")
    p.set_defaults(func=_stats)


def _sweep(args: argparse.Namespace) -> int:
    from . import experiments
    from .cache import atomic_write_bytes
    from .tasks import check_tasks

    # Everything is checked before anything is built, measured or written.
    pair = experiments.pair(
        args.pair,
        pre=args.pre,
        post=args.post,
        loss_data=args.loss_data,
        smoke=args.smoke,
        kind=args.kind,
        dpo_beta=args.dpo_beta,
    )
    values = _grid_values(args.grid)
    seeds = _int_list(args.seeds, "--seeds")
    tasks = check_tasks(args.tasks.split(",")) if args.tasks else None
    if args.limit is not None and args.limit < 1:
        raise InvalidParameterError(f"--limit must be a positive number of documents, got {args.limit}")
    measure = [m.strip() for m in args.measure.split(",") if m.strip()]
    trials = experiments.grid(
        pair,
        args.method,
        values,
        seeds,
        fixed=parse_settings(args.set),
        measure=measure,
        rule=args.rule,
        points=args.points,
        mode=args.mode,
        tasks=tasks,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
    )
    shard = experiments.parse_shard(args.shard)
    store = experiments.Store(args.store)
    before, n = experiments.stored(trials, store)
    table = experiments.run(trials, store=store, shard=shard)
    after, _ = experiments.stored(trials, store)
    if args.csv:
        atomic_write_bytes(args.csv, table.to_csv(index=False).encode())
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(
        f"{n} trial(s){where}: {before} from the store, {after - before} measured, {n - after} left to other "
        f"workers; {len(table)} rows{f' written to {args.csv}' if args.csv else ''}; store {store.folder}"
    )
    summary = table[table.quantity.isin(["term", "loss_change", "second_order"])]
    if not summary.empty:
        means = summary.pivot_table(index="edit", columns="quantity", values="value", aggfunc="mean")
        print(means.to_string(float_format=lambda x: f"{x:.4g}"))
    return 0


def _grid_values(items: list[str] | None) -> dict[str, list]:
    """``--grid NAME=V1,V2`` options -> {NAME: [V1, V2]}."""
    from .settings import parse_value

    values = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise InvalidParameterError(f"--grid expects NAME=V1,V2,..., got {item!r}")
        values[key.strip()] = [parse_value(v.strip()) for v in text.split(",")]
    return values


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidParameterError(f"{what} expects integers separated by commas, got {text!r}") from None


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="measure an edit over a grid of settings and seeds, into the resumable store")
    p.add_argument("--pair", help="a zoo pair (tiny-lm, tiny-lm-dpo, tiny-vit/rot90, tiny-lm[sft_lr=5e-5], ...)")
    _add_pair_args(p, required=False)
    p.add_argument(
        "--method",
        required=True,
        help="an edit: dare, drop_only, bitdelta, low_rank, magnitude_trim, extrapolate, sign_biased, product_biased",
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="NAME=V1,V2",
        help="values of a setting (repeatable: the grid is their cartesian product)",
    )
    p.add_argument("--set", action="append", metavar="NAME=V", help="a setting fixed for every trial (repeatable)")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2 (an edit that draws nothing runs once)")
    p.add_argument(
        "--measure",
        default="term,loss_change",
        help="some of term, loss_change, second_order, scores (default: term,loss_change)",
    )
    p.add_argument("--tasks", help="lm-eval tasks for scores, e.g. ud_add,ud_word or gsm8k (default: the pair's)")
    p.add_argument("--limit", type=int, help="documents per task for scores (default: all)")
    p.add_argument(
        "--rule",
        default="left",
        help="quadrature rule of the term: left (the paper's), right, midpoint, trapezoid, gauss",
    )
    p.add_argument("--points", type=int, default=5, help="evaluations of the integrand (the paper's C = 5)")
    p.add_argument("--mode", default="grad", choices=["grad", "jvp"], help="backward passes or forward-mode")
    p.add_argument(
        "--loss-data",
        help="for --pre/--post: a JSONL of prompt/answer records, or hf:NAME[:CONFIG]:SPLIT"
        " (--kind dpo: preference triples, e.g. hf:HuggingFaceH4/ultrafeedback_binarized:test_prefs)",
    )
    p.add_argument(
        "--kind",
        choices=["dpo", "embedding", "lm", "vision"],
        help="for --pre/--post: what the pair is (default "
        "lm: a causal LM; dpo: SFT -> DPO, the DPO loss with pre as the reference)",
    )
    p.add_argument("--dpo-beta", type=float, help="--kind dpo: the DPO loss's beta (default 0.1)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:1, ..., or auto: a model larger than one GPU, "
        "placed over all of them by accelerate's device_map",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--store", help="the store folder (default: the project's cache); share it between workers")
    p.add_argument("--csv", metavar="FILE", help="write the tidy table as CSV")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="this worker's share of the grid (default: torchrun's RANK/WORLD_SIZE or a SLURM array's task id, if set)",
    )
    p.add_argument("--smoke", action="store_true", help="zoo pairs: the smoke recipe (seconds to build)")
    p.set_defaults(func=_sweep)


def _zoo_build(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from . import zoo

    names = args.names or (zoo.names() if args.widths else zoo.default_names())
    for name in names:
        zoo.recipe_for(name)  # fail on an unknown name before training anything
    bar = tqdm(names, desc="zoo build", unit="pair")
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        pre, post = zoo.load_pair(name, progress=True)
        bar.write(f"{name}: {time.perf_counter() - start:.1f} s  pre={pre}  post={post}")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from . import zoo

    for name in zoo.names():
        d = zoo.describe(name)
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d["metrics"].items())
        print(f"{name:22s} {'built' if d['built'] else 'not built':10s} {d['post'] if d['built'] else ''} {metrics}")
    return 0


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the embedded default model pairs (tiny LM, tiny ViT)")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="train and cache the pairs (the default ones unless named)")
    b.add_argument("names", nargs="*", metavar="NAME", help="pairs to build, e.g. tiny-lm tiny-vit/rot90")
    b.add_argument("--widths", action="store_true", help="also build the LM width family (tiny-lm/<width>)")
    b.set_defaults(func=_zoo_build)
    ls = zsub.add_parser("list", help="list the pairs, whether they are built, and their metrics")
    ls.set_defaults(func=_zoo_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifieddelta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # One registration line per sub-command; the functions above hold the behaviour.
    _add_book(sub)
    _add_edit(sub)
    _add_stats(sub)
    _add_sweep(sub)
    _add_zoo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UnifiedDeltaError as e:
        print(f"unifieddelta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unifieddelta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
