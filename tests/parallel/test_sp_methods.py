"""The SP method registry: a method written and registered from this file runs end to end, exact, for every linear
family, and is priced by its own cost formula; a half-registered or unknown method fails loudly.

This file is the proof of the "new SP method" recipe in docs/architecture.md: `BlockingGather` below is a complete
method (the four steps of a handle over the algebra of lsp.parallel.affine, and a cost formula), and nothing in
`lsp/` changes for it to run in sp_linear_attention, sp_delta_rule, SPContext, the cost model and the planner.
"""
import pytest
import torch

from lsp.parallel import (
    SPContext,
    comm_stats,
    register_method,
    reset_comm_stats,
    sp_linear_attention,
    sp_method,
    sp_methods,
    unregister_method,
)
from lsp.parallel.methods import check_registered

from .cases import FORMS, make_case, max_rel_err, reference, run_sp
from .delta_cases import delta_reference, make_delta_case, run_sp_delta

TOY = "toy_gather"


class BlockingGather:
    """Toy method: a blocking all_gather of every segment's S and P in `finish` (nothing overlaps), the prefix
    E_{i+1} = c_{i+1} (A_i E_i + S_i) composed by the family's ops; backward gathers gE and P and runs the suffix
    G_i = gE_i + c_{i+1} A_iᵀ G_{i+1}. `forget_map` drops A_i (a wrong method, for the negative control)."""

    forget_map = False

    def __init__(self, sp, plan, family, tag, scan_blocks):
        self.sp, self.plan, self.fam, self.tag = sp, plan, family, tag

    def _gather(self, x, tag):
        # x: [R, L, ...] -> [W, L, ...] every rank's rows (None stays None)
        return None if x is None else self.sp.comm.all_gather(x.reshape(x.shape[0], -1), tag).reshape(
            self.sp.world_size, *x.shape[1:])

    def _A(self, P_all, S_like, i):
        r, l = self.sp.owner(i)
        A = self.fam.map(None if P_all is None else P_all[r, l], self.plan.passes[i], S_like)
        return A * 0 if self.forget_map else A

    def _held(self, per_segment):
        sp = self.sp
        return torch.stack([torch.stack([per_segment[i] for i in sp.rank_segments(r)]) for r in sp.comm.ranks])

    def launch(self, S, P):
        self.S, self.P = S, P

    def finish(self):
        S_all, P_all = self._gather(self.S, self.tag), self._gather(self.P, self.tag + "/map")
        self.S = self.P = None
        E = [torch.zeros_like(S_all[0, 0])]
        for i in range(self.sp.num_segments - 1):
            S_i = S_all[self.sp.owner(i)]
            E.append(self.plan.cont[i + 1] * (self.fam.apply(self._A(P_all, S_i, i), E[i]) + S_i))
        return self._held(E)

    def launch_backward(self, gE, E, P):
        self.bwd = (self._gather(gE, self.tag + ":bwd"), self._gather(P, self.tag + ":bwd/map"), E, P)

    def input_grads(self):
        (gE_all, P_all, E, P), self.bwd = self.bwd, None
        sp, gS, gP = self.sp, {}, {}
        E_held = {i: E[sp.comm.row(r), l] for r in sp.comm.ranks for l, i in enumerate(sp.rank_segments(r))}
        X = torch.zeros_like(gE_all[0, 0])   # c_{i+1} G_{i+1}
        for i in reversed(range(sp.num_segments)):
            r, l = sp.owner(i)
            A_i = self._A(P_all, X, i)
            if i in E_held:
                gS[i] = X
                gP[i] = None if P is None else self.fam.grad(P_all[r, l], A_i, X, E_held[i], self.plan.passes[i])
            X = self.plan.cont[i] * (gE_all[r, l] + self.fam.apply(A_i, X, transpose=True))
        return self._held(gS), (None if P is None else self._held(gP))


def toy_cost(W, state_bytes, map_bytes, t_overlap, hw, layout, scan_blocks=None):
    """Two blocking all_gathers (S, then the map) of L segments per rank: nothing overlaps."""
    L = 2 if layout == "zigzag" else 1
    if W == 1:
        return 0.0, 0.0
    return (W - 1) * (2 * hw.latency + L * (state_bytes + map_bytes) / hw.bandwidth), (W - 1) * L * (
        state_bytes + map_bytes)


@pytest.fixture
def toy():
    register_method(TOY, handle=BlockingGather, cost=toy_cost, label="toy blocking gather")
    yield TOY
    unregister_method(TOY)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("varlen", [False, True])
def test_toy_method_is_exact_for_every_family(toy, layout, varlen):
    """The toy method, chosen by name on the context, equals the single-device op (fp64) for every decay form and
    for the gated delta rule: outputs, final states and every gradient."""
    assert toy in sp_methods()
    sp = SPContext(emulate=3, layout=layout, method=toy)
    for form in FORMS:
        case = make_case(3, form, varlen)
        err = max_rel_err(run_sp(case, sp, None), reference(case))
        assert max(err.values()) < 1e-10, (form, err)
    case = make_delta_case(3, True, varlen)
    err = max_rel_err(run_sp_delta(case, sp, None), delta_reference(case))
    assert max(err.values()) < 1e-10, err


def test_negative_control_toy_without_map_fails(toy, monkeypatch):
    """The same toy with A_i dropped (the entering state not carried through the segment) must fail."""
    monkeypatch.setattr(BlockingGather, "forget_map", True)
    sp = SPContext(emulate=3, layout="zigzag", method=toy)
    case = make_case(3, "key", False)
    assert max_rel_err(run_sp(case, sp, None), reference(case))["o"] > 1e-3
    case = make_delta_case(3, True, False)
    assert max_rel_err(run_sp_delta(case, sp, None), delta_reference(case))["o"] > 1e-3


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_toy_method_is_priced_by_its_formula(toy, layout):
    """The cost model and the planner price the toy by its registered formula: the modelled bytes are what the
    toy sends (comm_stats), and `plan` ranks it beside the built-ins."""
    from lsp.plan.costmodel import exchange_time, plan

    W, B, H, K, V = 3, 2, 2, 8, 6
    case = make_case(W, "key", False, dtype=torch.float32, H=H, K=K, V=V)
    reset_comm_stats()
    run_sp(case, SPContext(emulate=W, layout=layout), toy)
    got = sum(v["bytes_recv"] for k, v in comm_stats()["by_tag_op"].items()
              if k.startswith(toy) and ":bwd" not in k) / W
    _, modelled = exchange_time(toy, W, B * H * K * V * 4, 0.0, layout=layout, decay_bytes=B * H * K * 4)
    assert got == pytest.approx(modelled, rel=1e-12) and got > 0
    assert toy in {row["method"] for row in plan(8, 2 ** 20)}
    assert "toy blocking gather" in {row["label"] for row in plan(8, 2 ** 20)}


def test_half_registered_or_unknown_method_fails_loudly():
    """A method without its implementation or its cost formula cannot be registered; a name the config accepts
    but nobody registered, or an unknown name, raises wherever it is used."""
    from lsp.plan.costmodel import exchange_time, step_time

    with pytest.raises(ValueError, match="cost"):
        register_method("half", handle=BlockingGather, cost=None)
    with pytest.raises(ValueError, match="handle"):
        register_method("half", handle=None, cost=toy_cost)
    assert "half" not in sp_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method("allgather", handle=BlockingGather, cost=toy_cost)
    with pytest.raises(RuntimeError, match="'tree'"):
        check_registered(("allgather", "tree"))   # a name added to lsp.names.SP_METHODS without its method file
    check_registered()                            # the real list is complete
    with pytest.raises(ValueError, match="method must be one of"):
        SPContext(emulate=2, method="tree")
    with pytest.raises(ValueError, match="method must be one of"):
        sp_method("tree")
    with pytest.raises(ValueError, match="method must be one of"):
        exchange_time("tree", 4, 1.0, 0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        step_time("tree", 4, 4096)
    q = torch.randn(4, 8, 2, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        sp_linear_attention(q, q, q, sp=SPContext(emulate=2), method="tree")


def test_another_family_registers_its_methods_the_same_way():
    """The registry is one kind per layer family: a softmax family keeps its methods (LASP-2H, a K/V ring) in its
    own MethodRegistry with the same rules."""
    from dataclasses import dataclass

    from lsp.parallel.registry import MethodRegistry

    @dataclass(frozen=True)
    class SoftmaxMethod:
        name: str
        handle: object
        cost: object

    softmax = MethodRegistry("softmax", ("allgather", "ring"))
    softmax.register(SoftmaxMethod("allgather", handle=len, cost=len))
    with pytest.raises(RuntimeError, match="'ring'"):
        softmax.check_registered()          # a built-in named but not registered
    with pytest.raises(ValueError, match="cost must be callable"):
        softmax.register(SoftmaxMethod("ring", handle=len, cost=None))
    softmax.register(SoftmaxMethod("ring", handle=len, cost=len))
    softmax.check_registered()
    assert softmax.names() == ("allgather", "ring") and softmax.get("ring").handle is len
    with pytest.raises(ValueError, match="method must be one of"):
        softmax.get("tree")
