"""Config schema: YAML + overrides, and one-line / exit-code-2 rejection of bad configs through `lsp train`."""
import os
import subprocess
import sys

import pytest

from lsp.cli import main as lsp_main
from lsp.run_config import Config, ConfigError, load_config, validate

from .conftest import REPO, TINY, run_lsp


def test_defaults_yaml_and_overrides():
    assert load_config() == Config()
    cfg = load_config(TINY, ["train.steps=7", "optim.betas=[0.8,0.9]", "parallel.sp_method=ring",
                             "model.rope_theta=500000.0", "checkpoint.resume=false"])
    assert cfg.name == "tiny-cpu" and cfg.parallel.sp == 2          # from the YAML
    assert cfg.train.steps == 7 and cfg.optim.betas == [0.8, 0.9]    # overrides win
    assert cfg.parallel.sp_method == "ring" and cfg.checkpoint.resume is False
    assert cfg.model.rope_theta == 500000.0
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.train.steps, int)
    assert cfg.checkpoint_dir.endswith("runs/tiny-cpu/checkpoints")


def test_world_size_checks():
    cfg = load_config(TINY)
    validate(cfg, world_size=4)                       # dp = 2 inferred
    with pytest.raises(ConfigError, match="parallel.sp"):
        validate(cfg, world_size=3)
    cfg.parallel.dp = 3
    with pytest.raises(ConfigError, match=r"parallel.dp: dp=3 x sp=2 != world size 4"):
        validate(cfg, world_size=4)


# (command, overrides, expected message); {tmp} is the test's temporary folder, which holds the fixture files
# made by `bad_inputs` below. `train` cases run `lsp train`, `launch2` runs `lsp launch --nproc-per-node 2`.
BAD = [
    ("train", ["nonsense=1"], "nonsense: unknown key"),
    ("train", ["model.hidden=64"], "model.hidden: unknown key"),
    ("train", ["parallel.sp_method=foo"], "parallel.sp_method: 'foo' is not one of allgather, allscan, ring"),
    ("train", ["model.linear_attn=mamba"], "model.linear_attn: 'mamba' is not one of deltanet, gated_deltanet, gla"),
    ("train", ["train.on_nonfinite=ignore"], "train.on_nonfinite: 'ignore' is not one of stop, skip"),
    ("train", ["train.steps=abc"], "train.steps:"),
    ("train", ["train.steps=0"], "train.steps: must be > 0"),
    ("train", ["optim.lr=-1"], "optim.lr: must be > 0"),
    ("train", ["parallel.sp=3"], "data.seq_len: 64 is not divisible into 6 whole segments"),
    ("train", ["parallel.sp=3", "parallel.layout=contiguous", "data.seq_len=64"],
     "data.seq_len: 64 is not divisible into 3 whole segments"),
    ("train", ["model.num_kv_heads=3", "model.num_heads=2"], "model.num_kv_heads: 3 does not divide"),
    ("train", ["model.num_heads=3"], "model.num_heads: 3 does not divide model.hidden_size=64"),
    ("train", ["model.layer_pattern=LXS"], "model.layer_pattern:"),
    # every HybridConfig field is a model key, checked by HybridConfig itself (tests/train/test_model_schema.py)
    ("train", ["model.head_dim=15"], "model.head_dim: must be a positive even int (RoPE rotates pairs), got 15"),
    ("train", ["model.linear_backend=trton"], "model.linear_backend: 'trton' is not one of auto, torch, triton, "
                                              "naive; did you mean triton?"),
    ("train", ["model.extra.rope_theta=1"], "model.extra.rope_theta: unknown key; did you mean model.rope_theta?"),
    ("train", ["optim.betas=[0.9]"], "optim.betas:"),
    ("train", ["data.val_fraction=1.5"], "data.val_fraction: 1.5 must be in [0, 1)"),
    ("train", ["parallel.zero=2"], "parallel.zero: 2 needs parallel.engine=fsdp or deepspeed"),
    ("train", ["parallel.engine=fsdp", "parallel.zero=1"], "parallel.zero: 1 with engine=fsdp"),
    ("train", ["data.kind=files"], "data.files: data.kind=files needs at least one file"),
    ("train", ["data.kind=files", "data.files=[{tmp}/missing.txt]", "train.micro_batch=1"],
     "data.files: file not found: {tmp}/missing.txt"),
    ("train", ["data.eval_batches=0"], "data.eval_batches: must be > 0"),
    ("train", ["data.kind=files", "data.files=[{tmp}/doc.txt]", "train.micro_batch=1", "data.tokenizer={tmp}/no.json"],
     "data.tokenizer: 'byte' or a tokenizers JSON file; file not found"),
    ("train", ["data.kind=files", "data.files=[{tmp}/doc.txt]", "train.micro_batch=1",
               "data.tokenizer={tmp}/garbage.json"], "data.tokenizer: {tmp}/garbage.json is not a tokenizers JSON"),
    ("train", ["data.kind=files", "data.files=[{tmp}/doc.txt]", "train.micro_batch=1",
               "data.tokenizer={tmp}/other.json"], "is JSON but not a tokenizers file"),
    # a well-formed but broken tokenizer: "needs the tokenizers package" here, or the loader's own error with it
    ("train", ["data.kind=files", "data.files=[{tmp}/doc.txt]", "train.micro_batch=1", "parallel.sp=1",
               "data.tokenizer={tmp}/broken.json"], "data.tokenizer: "),
    ("train", ["data.mqar.num_kv_pairs=40"], "data.mqar.num_kv_pairs: 40 > data.mqar.num_keys=16"),
    ("train", ["optim.min_lr=1.0"], "optim.min_lr: 1.0 is larger than optim.lr"),
    ("train", ["train.steps"], "override must look like key=value"),
    ("train", ["train.steps=1.5"], "train.steps:"),
    ("train", [], "parallel.sp: 2 does not divide the world size 1 (start it with: lsp launch --nproc-per-node 2"),
    ("launch2", ["parallel.dp=2"], "parallel.dp: dp=2 x sp=2 != world size 2"),
    ("launch2", ["parallel.sp=4", "data.seq_len=64"], "parallel.sp: 4 does not divide the world size 2"),
    # caught after torch is imported (they need the device / data), still one line, still nothing written
    ("train", ["parallel.sp=1", "parallel.backend=nccl"], "parallel.backend: nccl needs CUDA devices"),
    ("train", ["parallel.sp=1", "model.vocab_size=10"], "model.vocab_size: 10 is smaller than the data vocabulary 81"),
    ("train", ["parallel.sp=1", "train.device=cuda"], "train.device: cuda requested but no CUDA device is available"),
    # typos: the closest key or choice (difflib) is suggested
    ("train", ["parallel.sp_mehtod=ring"], "parallel.sp_mehtod: unknown key; did you mean parallel.sp_method?"),
    ("train", ["trian.steps=3"], "trian.steps: unknown key; did you mean train.steps?"),
    ("train", ["xyzzy=3"], "config error: xyzzy: unknown key"),
    ("train", ["parallel.sp_method=allgater"], "is not one of allgather, allscan, ring; did you mean allgather?"),
    ("train", ["parallel.layout=zigzg"], "'zigzg' is not one of zigzag, contiguous; did you mean zigzag?"),
    ("train", ["data.kind=file"], "data.kind: 'file' is not one of mqar, files, hf; did you mean files?"),
    ("train", ["logging.wandb_mode=onlin"], "did you mean online?"),
    ("train", ["train.precision=fp16"], "train.precision: 'fp16' is not one of auto, bf16, fp32"),
    ("train", ["checkpoint.save_on_signals=[SIGKILL]"], "checkpoint.save_on_signals: 'SIGKILL' is not one of SIGTERM"),
    ("train", ["checkpoint.save_timeout_s=0"], "checkpoint.save_timeout_s: must be > 0"),
    # broken YAML files (written by `bad_inputs`): file, line and column; typos in the file as in overrides
    ("file:typo.yaml", [], "model.hiden_size: unknown key; did you mean model.hidden_size?"),
    ("file:unclosed.yaml", [], "config: {tmp}/unclosed.yaml:4:1: did not find expected ',' or ']'"),
    ("file:tab.yaml", [], "config: {tmp}/tab.yaml:2:1: found character that cannot start any token"),
    ("file:dup.yaml", [], "config: {tmp}/dup.yaml:2:1: found duplicate key model"),
    ("file:list.yaml", [], "config: {tmp}/list.yaml must be a YAML mapping of sections"),
    # command lines as typed (no safety overrides appended); options may also follow the config (test below)
    ("raw", ["launch", "{tiny}", "--nproc-per-node"], "error: lsp launch: argument --nproc-per-node: expected one"),
    ("raw", ["train", "{tiny}", "train.steps=2", "--max-restarts=1"], "lsp train: unrecognized arguments: --max"),
    ("raw", ["plan", "{tiny}", "--gpus", "x"], "error: lsp plan: argument --gpus: invalid int value: 'x'"),
    ("raw", ["eval", "{tmp}/nowhere"], "error: no complete checkpoint found under {tmp}/nowhere"),
    ("raw", ["eval", "{tmp}"], "error: no complete checkpoint found under {tmp}"),
    ("raw", ["launch", "--nproc-per-node", "0", "{tiny}"], "error: --nproc-per-node and --nnodes must be >= 1"),
    ("raw", ["launch", "--nnodes", "2", "--nproc-per-node", "2", "{tiny}"], "--rdzv-endpoint HOST:PORT is required"),
    ("raw", ["plan", "--gpus", "0", "{tiny}"], "error: --gpus must be positive, got 0"),
    ("raw", ["train"], "the following arguments are required: config"),
    ("raw", ["trian", "{tiny}"], "error: lsp: unknown command 'trian' (one of train,"),
    # caught by `lsp launch` before any rank starts (it was ~40 lines of torchrun traceback, exit 1)
    ("launch2", ["data.kind=hf"], "data.hf.path: data.kind=hf needs"),
    ("launch2", ["parallel.backend=nccl", "train.device=cpu"], "parallel.backend: nccl needs CUDA devices"),
    # a folder that cannot be made, a list without brackets, a folder as a file, an abbreviated key (issue 23)
    ("train", ["out_dir={tmp}/doc.txt"], "out_dir: cannot create {tmp}/doc.txt/tiny-cpu: {tmp}/doc.txt is a file"),
    ("train", ["checkpoint.dir={tmp}/doc.txt/ckpt"], "checkpoint.dir: cannot create {tmp}/doc.txt/ckpt: {tmp}/doc.txt"),
    ("train", ["data.kind=files", "data.files={tmp}/doc.txt"], "data.files: must be a list; write data.files=[...]"),
    ("train", ["data.kind=files", "data.files=[{tmp}]", "train.micro_batch=1"], "data.files: {tmp} is a folder, not"),
    ("train", ["optim.learning_rate=0.1"], "optim.learning_rate: unknown key; did you mean optim.lr?"),
    ("raw", ["train", "{tmp}"], "config error: config: {tmp} is a folder, not a file"),
    ("train", ["data.kind=files", "data.files=[{tmp}/doc.txt]", "train.micro_batch=1", "data.tokenizer={tmp}"],
     "data.tokenizer: 'byte' or a tokenizers JSON file; {tmp} is a folder, not a file"),
    ("train", ["model.layer_pattern=mamba2,rwkv6,S"],
     "model.layer_pattern: 'rwkv6' (entry 1 of 'mamba2,rwkv6,S') is not one of L, S, softmax, deltanet,"),
    ("train", ["model.ssm_groups=3"], "model.ssm_groups: 3 does not divide model.num_heads=2"),
    ("train", ["parallel.sp=1", "model.linear_attn=rwkv7", "model.linear_backend=triton"],
     "model.linear_backend: 'triton': linear kind 'rwkv7' runs on dplr_delta_rule, whose backends are auto, torch, "
     "naive"),
    *([("train", ["parallel.sp=1", "out_dir=/proc/lsp-nowhere"],   # passes the early check as root: the first write
        "out_dir: cannot create /proc/lsp-nowhere/tiny-cpu: No such file or directory")]
      if os.path.isdir("/proc/self") else []),
]


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "doc.txt").write_text("hello")
    (tmp_path / "garbage.json").write_bytes(b"\x00\xffnot json")
    (tmp_path / "other.json").write_text('{"vocab": {}}')
    (tmp_path / "broken.json").write_text('{"model": {"type": "NoSuchModel"}}')
    yamls = {"typo.yaml": "model:\n  hiden_size: 64\n", "unclosed.yaml": "model:\n  hidden_size: 64\n  x: [1\n",
             "tab.yaml": "model:\n\thidden_size: 64\n", "dup.yaml": "model: {hidden_size: 64}\nmodel: {}\n",
             "list.yaml": "- model\n- data\n"}
    for name, text in yamls.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("command,overrides,message", BAD, ids=[f"{i:02d}-{b[1][0] if b[1] else b[0]}"
                                                                for i, b in enumerate(BAD)])
def test_bad_config_is_one_line_exit_2_nothing_written(command, overrides, message, bad_inputs):
    tmp = str(bad_inputs)
    out = os.path.join(tmp, "out")
    before = sorted(os.listdir(tmp))
    safety = [f"out_dir={out}", f"data.cache_dir={tmp}/cache", "train.steps=2", "logging.wandb=false"]
    fill = lambda text: text.replace("{tmp}", tmp).replace("{tiny}", TINY)   # noqa: E731
    args = safety + [fill(o) for o in overrides]    # the case's own overrides win
    if command == "raw":
        args = [fill(o) for o in overrides]
    elif command.startswith("file:"):
        args = ["train", os.path.join(tmp, command[5:]), *args]
    else:
        args = ["train", TINY, *args] if command == "train" else ["launch", "--nproc-per-node", "2", TINY, *args]
    proc = run_lsp(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr                     # one line, no traceback
    assert lines[0].startswith(("config error: ", "error: ")) and fill(message) in lines[0], lines[0]
    assert proc.stdout == ""
    assert sorted(os.listdir(tmp)) == before                # no run dir, no token cache, nothing


def test_bad_input_table_is_documented():
    """docs/reliability.md lists every case of BAD (its message, without the {tmp} parts)."""
    with open(os.path.join(REPO, "docs", "reliability.md")) as f:
        doc = f.read()
    missing = [m for _, _, m in BAD if m.split("{tmp}")[0].split("{tiny}")[0].replace("|", "\\|") not in doc]
    assert missing == []


def test_bad_config_table_is_large_and_distinct():
    assert len({(c, tuple(o)) for c, o, _ in BAD}) == len(BAD) >= 50


def test_missing_file_and_usage_errors():
    for args, message in [(("train", "nope.yaml"), "config error: config: file not found: nope.yaml"),
                          (("launch", "--nproc-per-node", "x", TINY), "error: lsp launch: argument"),
                          (("eval", "/nonexistent"), "error: no complete checkpoint found under /nonexistent")]:
        proc = run_lsp(*args, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(message), proc.stderr


def test_options_may_follow_the_config():
    """`lsp launch cfg.yaml k=v --nproc-per-node 2` parses as with the options first (it used to blame the
    overrides); a misspelt option after the config is still an error (the BAD rows above)."""
    from lsp.cli import build_parser, parse_args
    parser = build_parser()
    late = parse_args(parser, ["launch", TINY, "train.steps=2", "--nproc-per-node", "2", "name=x"])
    early = parse_args(parser, ["launch", "--nproc-per-node", "2", TINY, "train.steps=2", "name=x"])
    assert vars(late) == vars(early) and late.nproc_per_node == 2 and late.overrides == ["train.steps=2", "name=x"]
    assert parse_args(parser, ["plan", TINY, "--gpus", "64"]).gpus == 64


def test_good_config_is_accepted_control():
    # negative control for the test above: the same entry point accepts the valid config
    load_config(TINY, ["train.steps=1"])


def test_missing_deepspeed_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)   # absent here whether or not it is installed
    assert lsp_main(["train", TINY, "parallel.engine=deepspeed", "parallel.sp=1", "logging.wandb=false"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("config error: parallel.engine: deepspeed is not installed")


@pytest.mark.parametrize("argv", [["eval", "/nonexistent"], ["train", TINY, "trian.steps=1"],
                                  ["launch", TINY, "--nproc-per-node", "0"], ["train", "missing.yaml"]],
                         ids=["eval-missing-dir", "typo", "launch-nproc", "missing-config"])
def test_cheap_errors_answer_before_importing_torch(argv):
    """These need no torch (importing it costs seconds: `lsp eval` on a missing dir took 9.6 s)."""
    code = f"import sys; from lsp.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_torch_import_check_control():
    """Control for the test above: an error found by the trainer (vocabulary) is caught after torch is imported."""
    argv = ["train", TINY, "parallel.sp=1", "model.vocab_size=1"]
    code = f"import sys; from lsp.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.split() == ["2", "True"], out.stderr


@pytest.mark.parametrize("typed, meant", [
    ("optim.learning_rate", "optim.lr"),             # an abbreviation; it suggested optim.min_lr (shared prefix)
    ("optim.wd", "optim.weight_decay"),
    ("parallel.sp_mehtod", "parallel.sp_method"),    # spelling within the section
    ("model.sp_method", "parallel.sp_method"),       # the same name in another section
    ("trian.steps", "train.steps"),                  # no such section: compared whole
    ("optim.momentum", None),                        # nothing close: no suggestion (control)
    ("xyzzy", None),
])
def test_closest_key(typed, meant):
    from lsp.run_config import closest_key, schema_keys
    assert closest_key(typed, schema_keys()) == meant
