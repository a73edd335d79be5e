"""Bad input gets a clear error, and the engine keeps serving the next batch."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from checkpoints import VOCAB
from engine_helpers import SeqPager, all_row_logits, make_engine, random_prompts

from pie.engine.batch import ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.errors import BatchError, CheckpointError, ModelNotFoundError, UnsupportedModelError


@pytest.fixture(scope="module")
def engine(checkpoint_dir):  # type: ignore[no-untyped-def]
    return make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=64, max_batch_tokens=256,
                       max_batch_size=4, max_dist_size=8, max_num_embeds=1)


def _req(**kw: object) -> Request:
    base = {"tokens": [5, 6, 7], "positions": [0, 1, 2], "page_ids": [0], "last_page_len": 3,
            "outputs": [OutputSpec(2, Sampler())]}
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


BAD = {
    "page id out of range": (_req(page_ids=[64]), "page id 64 is out of range: the pool has pages 0..63"),
    "negative page id": (_req(page_ids=[-1]), "out of range"),
    "positions/tokens mismatch": (_req(positions=[0, 1]), "3 tokens but 2 positions"),
    "no tokens": (_req(tokens=[], positions=[]), "no input tokens"),
    "too few slots": (_req(last_page_len=2), "pages hold only 2 slots"),
    "token outside vocab": (_req(tokens=[5, 6, VOCAB]), f"token id {VOCAB} is outside"),
    "output row out of range": (_req(outputs=[OutputSpec(3, Sampler())]), "reads row 3"),
    "sampler and probe": (_req(outputs=[OutputSpec(0, Sampler(), Probe("entropy"))]), "exactly one"),
    "top_p zero": (_req(outputs=[OutputSpec(0, Sampler("top_p", top_p=0.0))]), "out of range"),
    "distribution too large": (_req(outputs=[OutputSpec(0, probe=Probe("distribution", k=9))]), "max_dist_size = 8"),
    "too many embeddings": (_req(outputs=[OutputSpec(0, probe=Probe("embedding")), OutputSpec(1, probe=Probe("embedding"))]),
                            "max_num_embeds = 1"),
    "mask row count": (_req(attention_mask=[[0, 1]]), "attention mask has 1 rows for 3 input tokens"),
    "mask length": (_req(attention_mask=[[0, 1], [0, 2], [0, 2]]), "cover the kv length 3"),
    "mask attends nothing": (_req(attention_mask=[[0, 1, 2], [3], [0, 3]]), "attends to nothing"),
    "logit mask allows nothing": (_req(logit_mask=[10]), "allows no token"),
    "logit mask too long": (_req(logit_mask=[0, VOCAB + 1]), "over the vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_rejected_and_engine_keeps_serving(engine, case: str) -> None:  # type: ignore[no-untyped-def]
    request, message = BAD[case]
    with pytest.raises(BatchError, match=re.escape(message)):
        engine.forward_batch(ForwardBatch([request]))
    good = engine.forward_batch(ForwardBatch([_req()]))
    assert isinstance(good.outputs[0][0], int)


def test_batch_over_limits(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BatchError, match="over max_batch_size = 4"):
        engine.forward_batch(ForwardBatch([_req(page_ids=[i]) for i in range(5)]))
    long = list(range(3, 260))
    with pytest.raises(BatchError, match="over max_batch_tokens = 256"):
        engine.forward_batch(ForwardBatch([_req(tokens=long, positions=list(range(len(long))),
                                                page_ids=list(range(17)), last_page_len=1)]))
    with pytest.raises(BatchError, match="empty batch"):
        engine.forward_batch(ForwardBatch([]))
    with pytest.raises(BatchError, match="page copy source page id 99"):
        engine.forward_batch(ForwardBatch([_req()], page_copies=[(99, 0)]))
    assert isinstance(engine.forward_batch(ForwardBatch([_req()])).outputs[0][0], int)


def test_bad_batch_leaves_kv_untouched(engine) -> None:  # type: ignore[no-untyped-def]
    """A rejected batch must not have written K/V of its valid requests either."""
    prompt = random_prompts(1, VOCAB, 20, 20, seed=3)[0]
    before = all_row_logits(engine, [prompt])[0]
    pager = SeqPager(engine)
    good = pager.request(0, prompt, [])
    with pytest.raises(BatchError):
        engine.forward_batch(ForwardBatch([_req(tokens=[1, 2, 3, 4] * 5, positions=list(range(20)), page_ids=[0, 1]),
                                           _req(page_ids=[999])]))
    engine.forward_batch(ForwardBatch([good]))
    after = all_row_logits(engine, [prompt])[0]
    assert (before == after).all()


def test_unknown_model_type_is_a_clear_error(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = checkpoint_dir("qwen3")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'frobnicator' is not supported.*qwen3"):
        make_engine(tmp_path / "m")


def _resave(src, dst, edit):  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _resave(checkpoint_dir("llama"), tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.self_attn.k_proj.weight"):
        make_engine(d)


def test_unexpected_tensor_is_named(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    d = _resave(checkpoint_dir("llama"), tmp_path / "m", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=re.escape("unexpected tensor 'model.extra.weight'")):
        make_engine(d)


def test_misshaped_tensor_is_named(checkpoint_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    def shrink(t):  # type: ignore[no-untyped-def]
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)

    d = _resave(checkpoint_dir("llama"), tmp_path / "m", shrink)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(3, 64\)"):
        make_engine(d)


def test_uncached_repo_offline_says_how_to_fetch(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=re.escape("pie model download nobody/no-such-model")):
        make_engine("nobody/no-such-model")
    with pytest.raises(ModelNotFoundError, match=r"holds no config\.json"):
        make_engine(tmp_path)
