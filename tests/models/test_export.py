"""`lsp export`: the Hugging Face folder loads through transformers (remote code) with lsp's logits and generation.

Reference: lsp's own HybridLM on the same weights. The wrapper runs the very same modules, so logits agree
bitwise; a model with one weight perturbed is the negative control. The transformers tests skip without it
(`lsp-hybrid[hf]`).
"""
import json
import logging
import os

import pytest
import torch

from lsp.export import export_model
from lsp.models import HybridConfig, HybridLM
from lsp.train.tokenizer import ByteTokenizer, IdTokenizer

try:
    import transformers
except ImportError:   # the import_hf round trip needs only safetensors and still runs
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None,
                              reason="transformers is not installed (pip install 'lsp-hybrid[hf]')")


def make_model(kind="gla", pattern="LS", tie=False, vocab=300):
    cfg = HybridConfig(vocab_size=vocab, hidden_size=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
                       layer_pattern=pattern, linear_attn=kind, tie_embeddings=tie)
    torch.manual_seed(0)
    return HybridLM(cfg).eval()


def load_hf(out_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True).eval()


def logged_by_transformers(fn):
    """(fn(), the messages transformers logged meanwhile); warning_once's memory is cleared first, so a warning an
    earlier test already triggered is seen again."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    transformers.utils.logging.warning_once.cache_clear()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        return fn(), [r.getMessage() for r in records]
    finally:
        root.removeHandler(handler)


@torch.no_grad()
@pytest.mark.parametrize("kind, pattern, tie", [("gla", "LS", False), ("lightning", "LLS", True),
                                                ("linear", "L", False), ("simple_gla", "SL", False),
                                                ("gated_deltanet", "LLS", False), ("mamba2", "LLS", False),
                                                ("hgrn2", "LLS", False), ("rwkv7", "LSL", False)])
@needs_hf
def test_hf_logits_equal_lsp(tmp_path, kind, pattern, tie):
    model = make_model(kind, pattern, tie)
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path)
    hf = load_hf(tmp_path)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    assert torch.equal(hf(ids).logits, model(ids).logits)
    with torch.no_grad():   # control: the comparison sees a change in any one weight
        model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert not torch.equal(hf(ids).logits, model(ids).logits)


@needs_hf
@torch.no_grad()
def test_hf_export_of_a_kind_mix(tmp_path):
    """A layer_pattern naming a kind per position round-trips through config.json: logits and decoding equal lsp."""
    cfg = HybridConfig(vocab_size=300, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       layer_pattern="mamba2,hgrn2,S", ssm_state_size=8)
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    export_model(model, IdTokenizer(300), tmp_path)
    hf = load_hf(tmp_path)
    assert [type(b.attn).__name__ for b in hf.model.layers] == ["Mamba2", "HGRN2", "SoftmaxAttention"]
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(hf(ids).logits, model(ids).logits)
    assert torch.equal(hf.generate(ids[:, :7], max_new_tokens=5, do_sample=False), model.generate(ids[:, :7], 5))


@needs_hf
@torch.no_grad()
@pytest.mark.parametrize("kind", ["gla", "gated_deltanet", "mamba2", "hgrn2", "rwkv7"])
def test_hf_generate_equals_lsp_and_decodes_one_token_per_step(tmp_path, kind):
    model = make_model(kind, "LLS")
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path)
    hf = load_hf(tmp_path)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    fed = []
    hook = hf.model.register_forward_pre_hook(lambda mod, args, kwargs: fed.append(args[0].shape[1]),
                                              with_kwargs=True)
    out, logged = logged_by_transformers(lambda: hf.generate(prompt, max_new_tokens=6, do_sample=False))
    hook.remove()
    assert torch.equal(out, model.generate(prompt, 6))
    assert fed == [7, 1, 1, 1, 1, 1]   # prefill once, then the cached state: no prefix is recomputed
    assert not [m for m in logged if "deprecated" in m], logged   # the cache goes by the installed version's name


@needs_hf
@torch.no_grad()
def test_hf_loss_uses_transformers_label_convention(tmp_path):
    model = make_model()
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    aligned = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    assert torch.equal(load_hf(tmp_path)(ids, labels=ids).loss, model(ids, labels=aligned).loss)


@needs_hf
def test_sharded_weights_load(tmp_path):
    model = make_model()
    files = export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path, max_shard_bytes=20_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert not os.path.exists(tmp_path / "model.safetensors")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"]) == {f"model.{k}" for k in model.state_dict()}
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path)(ids).logits, model(ids).logits)


def test_export_readme_says_how_to_load_without_a_prompt(tmp_path):
    # AutoTokenizer without trust_remote_code waited 15 s at a y/N prompt (transformers >= 5 reads config.json's
    # remote AutoConfig first); the folder's README names the loader that needs no remote code
    model = make_model(vocab=257)
    assert "README.md" in export_model(model, ByteTokenizer(), tmp_path / "text")
    text = (tmp_path / "text" / "README.md").read_text()
    assert "PreTrainedTokenizerFast.from_pretrained(OUT_DIR)" in text and "trust_remote_code=True" in text
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path / "ids")
    assert "No tokenizer" in (tmp_path / "ids" / "README.md").read_text()   # control: an MQAR run has none


@needs_hf
def test_readme_tokenizer_loads_without_remote_code_or_prompt(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr("builtins.input", lambda *prompt: asked.append(prompt) or "n")
    model, tok = make_model(vocab=257), ByteTokenizer()
    export_model(model, tok, tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf_tok("the quick")["input_ids"] == tok.encode("the quick") and hf_tok.eos_token_id == tok.eos_id
    assert asked == []
    if int(transformers.__version__.split(".")[0]) >= 5:   # control: the AutoTokenizer path asks (transformers 5.25)
        transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert len(asked) == 1 and "[y/N]" in asked[0][0]


@needs_hf
def test_byte_tokenizer_files_match_lsp(tmp_path):
    model = make_model(vocab=257)
    tok = ByteTokenizer()
    export_model(model, tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Hello, wörld — 文字!\n  tabs\tand spaces"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eos_id == 256


@needs_hf
def test_export_cli_on_a_trained_text_run(tmp_path, capsys):
    from lsp.cli import main as lsp_main
    from tests.train.conftest import SMALL, TINY, run_lsp
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    proc = run_lsp("train", TINY, f"out_dir={tmp_path}", "name=text", *SMALL, "train.steps=4", "parallel.sp=1",
                   "data.kind=files", f"data.files=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
                   "train.micro_batch=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir, out_dir = str(tmp_path / "text"), str(tmp_path / "hf")
    assert lsp_main(["export", run_dir, out_dir]) == 0
    assert {"config.json", "model.safetensors", "modeling_lsp.py", "tokenizer.json"} <= set(os.listdir(out_dir))
    capsys.readouterr()
    assert lsp_main(["generate", run_dir, "--prompt", "the quick", "--max-new-tokens", "10"]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    hf = load_hf(out_dir)
    out = hf.generate(torch.tensor([tok("the quick")["input_ids"]]), max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == expected
    assert lsp_main(["export", str(tmp_path / "missing"), out_dir]) == 2


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_import_hf_round_trip_is_bitwise(tmp_path, shard_bytes):
    from lsp.export import DEFAULT_MAX_SHARD_BYTES, import_hf
    model = make_model("gla", "LLS", tie=True)
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path, shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    back = import_hf(str(tmp_path))
    assert back.cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # control: the comparison sees one changed weight
    with torch.no_grad():
        back.layers[1].attn.q_proj.weight[0, 0] += 1e-6
    assert not torch.equal(back.layers[1].attn.q_proj.weight, model.layers[1].attn.q_proj.weight)


@needs_hf
def test_tokenizers_json_export_keeps_ids_and_adds_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lsp.train.tokenizer import HFTokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50,
                            trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bpe.save(str(tmp_path / "bpe.json"))
    tok = HFTokenizer(str(tmp_path / "bpe.json"))
    model = make_model(vocab=tok.vocab_size)
    export_model(model, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "the lazy fox, quickly"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id == tok.vocab_size - 1
    assert hf_tok.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=True) == tok.decode(tok.encode(text))
