"""Activation quantizers in inference read their levels from a table (issue #12 item 4).

``Quantizer.forward`` of an activation quantizer, when no autograd graph is recorded, on a plain
CPU tensor in eager mode, takes ``geta::quantize.table`` with a table built (on the second call
with the same scalars) by ``build_table`` from the ``geta::quantize`` this process runs.  The
oracle is that op: every value must be equal bit for bit, and every change of a scalar, also
one autograd does not see (``.data``), must be honoured on the next call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geta_fx
import geta_fx.quantizer as quantizer_mod
from geta_fx.ops import quantize_table as qt
from geta_fx.quantizer import TABLE_MAX_LEVELS, Quantizer

pytestmark = pytest.mark.skipif(
    qt.ensure_loaded().get("cpu", {}).get("impl") != "fused",
    reason="the fast path needs the compiled CPU kernel of geta::quantize.table "
           f"({qt.status().get('cpu', {}).get('reason')})")

@pytest.fixture(autouse=True)
def build_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build a table after its first call (the ski-rental threshold at 0), unless a test
    sets another cost; the cost model is restored after each test."""
    monkeypatch.setattr(quantizer_mod, "_BUILD_COST", [0.0, 0.0])


EDGES = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 1e30, -1e30]


def op(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.geta.quantize.default(x, q.d, q.effective_q_m(), q.t, q.signed)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: signs of zero and NaN positions included."""
    return a.dtype == b.dtype and torch.equal(a.float().view(torch.int32),
                                              b.float().view(torch.int32))


def act(bits: float = 4, q_m: float = 3.0, t: float = 1.07, signed: bool = False) -> Quantizer:
    return Quantizer("act", signed=signed, bits=bits, q_m=q_m, t=t, name="a")


def table_built(q: Quantizer) -> bool:
    state = getattr(q, "_inference_table", None)
    return bool(state) and bool(state[1])


def sample(shape: tuple[int, ...], q_m: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * q_m
    flat = x.view(-1)
    flat[:len(EDGES) + 2] = torch.tensor(EDGES + [q_m, -q_m])
    return x


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "q_m", "t"), [(4, 3.0, 1.07), (8, 7.5, 0.9997), (2, 1.0, 1.3)])
def test_inference_equals_the_op_bitwise(signed: bool, dtype: torch.dtype, bits: float,
                                         q_m: float, t: float) -> None:
    q = act(bits, q_m, t, signed)
    x = sample((8, 6, 11, 13), q_m).to(dtype)
    with torch.inference_mode():
        first = q(x)  # the first call with these scalars runs the op, then builds
        assert table_built(q)
        second, third = q(x), q(x[:, :, ::2].transpose(2, 3))
    assert table_built(q)
    assert same(first, op(q, x)) and same(second, op(q, x))
    assert same(third, op(q, x[:, :, ::2].transpose(2, 3)))  # strided input


def test_no_grad_also_uses_the_table_and_training_does_not() -> None:
    q = act()
    x = sample((4, 100), 3.0)
    with torch.no_grad():
        q(x), q(x)
    assert table_built(q)
    y = q(x)  # autograd on: the op, with its gradients to x, d, q_m and t
    assert y.grad_fn is not None
    y.sum().backward()
    assert q.log_d.grad is not None and q.t.grad is not None


@pytest.mark.parametrize("change", ["data", "set_bit_width", "optimizer", "signed",
                                    "load_state_dict"])
def test_a_changed_scalar_is_seen_on_the_next_call(change: str) -> None:
    q = act()
    x = sample((4, 300), 3.0)
    with torch.no_grad():
        q(x), q(x)
    assert table_built(q)
    if change == "data":  # not seen by the version counter: the values are compared
        q.t.data.fill_(1.21)
    elif change == "set_bit_width":
        q.set_bit_width(6)
    elif change == "optimizer":
        opt = torch.optim.Adam(q.parameters(), lr=1e-2)
        q(torch.randn(4, 300)).sum().backward()  # finite: x holds NaN and inf
        opt.step()
    elif change == "signed":
        q.signed = True
    else:
        other = act(bits=3, q_m=2.0, t=0.93)
        q.load_state_dict(other.state_dict())
    with torch.no_grad():
        got = [q(x), q(x), q(x)]  # the op, then a new table
    assert all(same(g, op(q, x)) for g in got)
    assert table_built(q)


def test_the_table_is_built_once_the_op_has_spent_its_cost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ski rental: the op's time with the same scalars is summed; the table comes when the sum
    reaches the estimated build cost, and a change of the scalars starts the sum again."""
    q = act()
    x = sample((64, 512), 3.0)
    monkeypatch.setattr(quantizer_mod, "_BUILD_COST", [float("inf"), 0.0])
    with torch.no_grad():
        for _ in range(5):
            assert same(q(x), op(q, x))
    assert not table_built(q) and q._inference_table[2] > 0  # the op's seconds, summed
    spent = q._inference_table[2]
    monkeypatch.setattr(quantizer_mod, "_BUILD_COST", [spent * 1.5, 0.0])
    with torch.no_grad():
        q(x)
        assert not table_built(q) or q._inference_table[2] >= spent * 1.5
        for _ in range(200):
            if table_built(q):
                break
            q(x)
    assert table_built(q)
    cost = list(quantizer_mod._BUILD_COST)
    assert cost != [spent * 1.5, 0.0]  # rescaled by the measured build time
    monkeypatch.setattr(quantizer_mod, "_BUILD_COST", [float("inf"), 0.0])
    q.set_bit_width(5)
    with torch.no_grad():
        q(x)
    assert q._inference_table[0][0] == float(q.log_d.detach()) and not q._inference_table[1]


def test_linear_and_wide_quantizers_keep_the_op() -> None:
    x = sample((4, 50), 3.0)
    wide = act(bits=14)
    with torch.no_grad():
        assert float(wide.effective_q_m() ** wide.t / wide.d) > TABLE_MAX_LEVELS
    for q in (act(t=1.0), wide):  # t == 1: a division; 14 bits: more than TABLE_MAX_LEVELS
        with torch.no_grad():
            got = [q(x), q(x)]
        assert not table_built(q) and all(same(g, op(q, x)) for g in got)


def test_weight_quantizers_keep_the_op() -> None:
    q = Quantizer("weight", bits=4, q_m=1.0, t=1.1)
    x = sample((16, 8), 1.0)
    with torch.no_grad():
        got = [q(x), q(x)]
    assert getattr(q, "_inference_table", None) is None and all(same(g, op(q, x)) for g in got)


def test_without_the_compiled_kernel_the_op_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantizer_mod, "_TABLE_KERNEL", [False])
    q = act()
    with torch.no_grad():
        q(sample((3, 40), 3.0)), q(sample((3, 40), 3.0))
    assert getattr(q, "_inference_table", None) is None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def _trained_like(seed: int = 0) -> geta_fx.GetaModule:
    torch.manual_seed(seed)
    model = _Net().eval()
    x = torch.randn(4, 3, 10, 10)
    gm = geta_fx.transform(model, (x,), quantize="weight_act")
    geta_fx.calibrate(gm, [(torch.randn(16, 3, 10, 10),)])
    with torch.no_grad():
        for i, q in enumerate(gm.quantizers.values()):
            q.set_bit_width(4 + i % 3)
            q.t.fill_(1.0 + 0.03 * (i + 1))
    gm.zero_units(next(g.id for g in gm.prunable_groups()), [0, 3])
    return gm.eval()


def test_exported_and_traced_graphs_keep_geta_quantize() -> None:
    """Tracing (torch.export: fake tensors; make_fx: a dispatch mode) must record the op the
    graph means, not the table built for this process's values."""
    gm = _trained_like()
    slim = gm.compress()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        slim(x), slim(x)  # tables built
    ep = torch.export.export(slim, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.geta.quantize.default in targets
    assert torch.ops.geta.quantize.table not in targets
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        traced = make_fx(slim)(x)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.ops.geta.quantize.table not in targets


def test_slim_and_geta_module_in_inference_equal_the_op() -> None:
    """compress()'s slim graph and the GetaModule itself, in inference, equal their op run."""
    gm = _trained_like()
    slim = gm.compress()
    x = torch.randn(5, 3, 10, 10)
    with torch.inference_mode():
        fast = [slim(x), slim(x), gm(x), gm(x)]
    assert any(table_built(q) for q in gm.quantizers.values())
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantizer_mod, "_TABLE_KERNEL", [False])
        slow = [slim(x), gm(x)]
    assert same(fast[0], slow[0]) and same(fast[1], slow[0])
    assert same(fast[2], slow[1]) and same(fast[3], slow[1])


def test_tables_survive_copies_and_pickles() -> None:
    """A slim graph whose tables are built deep-copies, pickles and torch.saves; the copies
    compute the same values (their tables are rebuilt or reused: keyed on the scalars)."""
    import copy
    import io
    import pickle

    gm = _trained_like(1)
    slim = gm.compress()
    x = torch.randn(3, 3, 10, 10)
    with torch.inference_mode():
        want = [slim(x), slim(x)][1]
    assert any(table_built(m) for m in slim.modules() if isinstance(m, Quantizer))
    buf = io.BytesIO()
    torch.save(slim, buf)
    buf.seek(0)
    for other in (copy.deepcopy(slim), pickle.loads(pickle.dumps(slim)),
                  torch.load(buf, weights_only=False)):
        with torch.inference_mode():
            assert all(same(other(x), want) for _ in range(3))


def test_sharded_scalars_keep_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer whose scalars are a tensor subclass (FSDP2's DTensor) is not read on the
    host: the op runs."""

    class Sub(torch.Tensor):
        pass

    q = act()
    q.t = nn.Parameter(torch.Tensor._make_subclass(Sub, q.t.detach().clone()))
    x = sample((4, 50), 3.0)
    with torch.no_grad():
        q(x), q(x)
    assert getattr(q, "_inference_table", None) is None

