"""The layer-kind registry: every built-in kind is one registered class, names are checked torch-free, unknown or
taken names raise, and no code in lsp/ branches on a kind (or SP method) name any more."""
import ast
import os
import subprocess
import sys

import pytest

import lsp.kinds
from lsp.hybrid_config import HybridConfig, HybridConfigError
from lsp.models import LinearKind, layer_kind, layer_kinds, register_kind
from lsp.names import SOFTMAX_SP_METHODS, SP_METHODS

LSP_DIR = os.path.dirname(lsp.kinds.__file__)
BUILTIN = {"linear", "lightning", "simple_gla", "gla", "deltanet", "gated_deltanet", "mamba2", "hgrn2", "kda",
           "rwkv7"}


def test_every_builtin_kind_is_one_registered_class_under_its_file_name():
    assert set(layer_kinds()) == BUILTIN
    for name in layer_kinds():
        cls = layer_kind(name)
        assert issubclass(cls, LinearKind) and cls.name == name and layer_kind(name) is cls


def test_unknown_kind_raises_one_line_naming_the_choices():
    with pytest.raises(ValueError, match="unknown linear layer kind 'mamba'; registered: .*gated_deltanet"):
        layer_kind("mamba")
    with pytest.raises(HybridConfigError, match="linear_attn: 'mamba' is not one of") as err:
        HybridConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, linear_attn="mamba")
    assert set(err.value.choices) == BUILTIN


def test_a_taken_name_or_a_non_kind_cannot_be_registered():
    class Impostor(layer_kind("gla")):
        name = "gla"

    with pytest.raises(ValueError, match="layer kind 'gla' is already registered"):
        register_kind(Impostor)
    with pytest.raises(TypeError, match="LinearKind subclass"):
        register_kind(object)
    assert layer_kind("gla") is not Impostor


def test_kind_names_are_checked_without_torch():
    code = ("import sys; from lsp.hybrid_config import HybridConfig; "
            "HybridConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, linear_attn='gated_deltanet'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


# ----------------------------------------------------------------------------------- name comparisons in lsp/
FAMILY_LISTS = {"DECAY_VARIANTS", "DELTA_VARIANTS", "DELTA_ATTN"}   # the name tuples of kind families at f4fa11f


def name_comparisons(source: str, names: set) -> list:
    """Lines of `source` that branch on one of `names`: a comparison (==, !=, in, not in) with the name as a string
    constant (alone or in a tuple / list / set), a `match` case on it, or a table (dict literal) keyed by it; and a
    membership test in a tuple of a kind family's names (`FAMILY_LISTS`)."""
    def strings(node):
        if isinstance(node, ast.Name) and node.id in FAMILY_LISTS:
            return {node.id}
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(strings(e) for e in node.elts))
        return set()

    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            found = set().union(*(strings(c) for c in [node.left, *node.comparators]))
        elif isinstance(node, ast.MatchValue):
            found = strings(node.value)
        elif isinstance(node, ast.Dict):
            found = set().union(*(strings(k) for k in node.keys if k is not None))
        else:
            continue
        if found & (names | FAMILY_LISTS):
            hits.append((node.lineno, sorted(found & (names | FAMILY_LISTS))))
    return [f"{line}: {names}" for line, names in sorted(hits)]


def comparisons_in_lsp(names: set) -> dict:
    out = {}
    for root, _, files in os.walk(LSP_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path) as fh:
                    if hits := name_comparisons(fh.read(), names):
                        out[os.path.relpath(path, LSP_DIR)] = hits
    return out


def test_nothing_in_lsp_branches_on_a_kind_name():
    """At f4fa11f this counted 21: layers.py 11, planner.py 9 (tables and family membership), flops.py 1."""
    found = comparisons_in_lsp(set(layer_kinds()))
    assert sum(len(h) for h in found.values()) == 0, found


def test_nothing_in_lsp_branches_on_an_sp_method_name():
    """SP methods, the linear layers' and the softmax layers', are their registries' (lsp/parallel/methods/,
    lsp/parallel/softmax.py): 13 comparisons / tables at f4fa11f (lsp/parallel 6, lsp/plan/costmodel.py 6,
    planner.py 1), none now; the issue allowed 2."""
    found = comparisons_in_lsp(set(SP_METHODS) | set(SOFTMAX_SP_METHODS) | {"ringkv"})
    assert sum(len(h) for h in found.values()) == 0, found


def spelled_defaults(source: str, names: set) -> list:
    """Lines where a name of `names` is written as a default: a parameter default or a field's value."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arguments):
            values = [*node.defaults, *(d for d in node.kw_defaults if d is not None)]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            values = [node.value]
        else:
            continue
        hits += [v.lineno for v in values if isinstance(v, ast.Constant) and v.value in names]
    return hits


def test_the_default_sp_methods_are_spelled_once():
    """The default SP methods are `lsp.names.DEFAULT_SP_METHOD` / `DEFAULT_SOFTMAX_METHOD`: "allgather" was
    written as a default in 6 places (run_config, planner, SPContext) before."""
    found = {}
    for root, _, files in os.walk(LSP_DIR):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f)) as fh:
                    if hits := spelled_defaults(fh.read(), set(SP_METHODS) | set(SOFTMAX_SP_METHODS)):
                        found[f] = hits
    assert found == {}, found
    control = 'def f(method: str = "allgather", *, m="ring"): pass\nclass C:\n    x: str = "allscan"\n'
    assert spelled_defaults(control, set(SP_METHODS)) == [1, 1, 3]


def test_negative_control_the_counter_sees_each_form():
    source = '''
if cfg.linear_attn == "gla": pass
if kind in ("deltanet", "gated_deltanet"): pass
if kind not in DELTA_VARIANTS: pass
decay = {"linear": 0, "gla": 1}[kind]
match kind:
    case "lightning": pass
if method != "ring": pass
if other == "something": pass
'''
    hits = name_comparisons(source, set(layer_kinds()) | set(SP_METHODS))
    assert [h.split(":")[0] for h in hits] == ["2", "3", "4", "5", "7", "8"]


def test_reset_buffers_restores_what_a_meta_load_leaves_uninitialised():
    """What the Hugging Face load (`LspHybridForCausalLM.restore_buffers`) calls on every linear kind: Lightning's
    decays, derived from the config and not saved, come back; a kind without such buffers is left as it is."""
    import torch

    from lsp.models import HybridLM

    cfg = HybridConfig(vocab_size=8, hidden_size=16, num_layers=3, num_heads=2, layer_pattern="LLS",
                       linear_attn="lightning")
    model = HybridLM(cfg)
    fresh = [b.attn.log_decay.clone() for b in model.layers[:2]]
    for block in model.layers[:2]:
        block.attn.log_decay.fill_(float("nan"))
    assert "log_decay" not in "".join(model.state_dict())                 # why it must be recomputed
    for module in model.modules():
        if isinstance(module, LinearKind):
            module.reset_buffers()
    for block, want in zip(model.layers[:2], fresh):
        torch.testing.assert_close(block.attn.log_decay, want)
    assert not torch.equal(fresh[0], fresh[1])                            # per layer: the depth factor differs
