"""What a run tells its user: every command-line option has a description, and a files run prints its corpus
(documents, tokens, windows, train / validation split, epochs at the configured steps) (issue 23)."""
import argparse

from lsp.cli import build_parser
from lsp.cli import main as lsp_main

from .conftest import SMALL, TINY


def undocumented(parser: argparse.ArgumentParser):
    """command:option of every argument without a help text."""
    return [f"{name}:{a.dest}" for name, sub in parser.commands.items() for a in sub._actions
            if not isinstance(a, argparse._HelpAction) and not a.help]


def test_every_option_has_a_description():
    assert undocumented(build_parser()) == []


def test_the_help_check_sees_a_bare_option():
    # control: an option added without help= is named
    parser = build_parser()
    parser.commands["launch"].add_argument("--new-flag", type=int)
    assert undocumented(parser) == ["launch:new_flag"]


def test_a_files_run_prints_its_corpus(tmp_path, capsys):
    docs = ["a" * 1000, "b" * 2000, "c" * 700]   # byte tokenizer: one token per byte, plus one end-of-document id
    paths = []
    for i, text in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(text)
        paths.append(str(tmp_path / f"d{i}.txt"))
    tokens = sum(len(d) + 1 for d in docs)              # 3703
    windows = (tokens - 1) // 32                         # data.seq_len=32 (SMALL): 115
    val = int(windows * 0.1)                             # 11
    args = ["train", TINY, f"out_dir={tmp_path}", "name=c", *SMALL, "parallel.sp=1", "data.kind=files",
            f"data.files=[{','.join(paths)}]", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1",
            "train.micro_batch=2", "train.grad_accum=2", "train.steps=3"]
    assert lsp_main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("lsp: corpus "))
    assert line == (f"lsp: corpus 3 documents, {tokens:,} tokens (with end-of-document ids) = {windows} windows of 32 "
                    f"tokens: {windows - val} train, {val} validation (data.val_fraction=0.1); 3 steps x 4 windows = "
                    f"{3 * 4 / (windows - val):.3g} epochs")
