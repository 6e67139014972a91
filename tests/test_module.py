"""GetaModule: train()/eval() rewrite the captured flags; zero_units/zero_mask are exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import geta_fx


class DropBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("captured_training", [True, False])
def test_train_eval_switch_dropout_and_batchnorm(captured_training: bool) -> None:
    model = DropBN().train(captured_training)
    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(model, (x,))
    assert gm.training is captured_training
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert torch.equal(gm(x), gm(x))  # deterministic in eval
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    b = gm(x)
    assert not torch.equal(a, b)  # dropout is live again
    rm = gm.graph_module.bn.running_mean.clone()
    gm(x)
    assert not torch.equal(rm, gm.graph_module.bn.running_mean)  # batch statistics update


def test_zero_units_and_zero_mask() -> None:
    gm = geta_fx.transform(DropBN().eval(), (torch.randn(2, 3, 8, 8),))
    (g,) = [g for g in gm.groups if g.prunable]
    assert not gm.zero_mask(g.id).any()
    gm.zero_units(g.id, [1, 4])
    assert gm.zero_mask(g.id).tolist() == [False, True, False, False, True, False]
    w = gm.graph_module.conv.weight
    assert w[1].abs().sum() == 0 and w[4].abs().sum() == 0 and w[0].abs().sum() > 0
    assert gm.graph_module.bn.weight[1] == 0 and gm.graph_module.conv.bias[4] == 0
    assert gm.graph_module.fc.weight[:, 1].abs().sum() > 0  # consumer columns untouched
    with pytest.raises(IndexError):
        gm.zero_units(g.id, [6])
    unprunable = next(x for x in gm.groups if not x.prunable)
    with pytest.raises(geta_fx.InputError, match="not prunable"):
        gm.zero_units(unprunable.id, [0])
    with pytest.raises(geta_fx.InputError, match="out of range"):
        gm.zero_mask(99)


def test_compress_without_zeros_is_identity_and_module_untouched() -> None:
    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(DropBN().eval(), (x,))
    slim = gm.compress()
    torch.testing.assert_close(slim(x), gm(x))
    gm.zero_units(0, [0, 2])
    before = gm.graph_module.conv.weight.shape
    slim = gm.compress()
    assert slim.conv.weight.shape[0] == 4 and gm.graph_module.conv.weight.shape == before


def test_compress_lower_packs_weights_and_matches(tmp_path) -> None:
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    gm = geta_fx.transform(m, (x,), quantize="weight")
    for q in gm.quantizers.values():
        q.set_bit_width(4.0)
    gm.zero_units(0, [0, 5, 7])
    slim = gm.compress(lower=True)
    assert "lowbit" in slim.code or "unpack_weight" in slim.code
    torch.testing.assert_close(slim(x), gm(x), atol=1e-5, rtol=1e-4)
    geta_fx.save(slim, tmp_path / "m.pt2", example_inputs=(x,))
    torch.testing.assert_close(geta_fx.load(tmp_path / "m.pt2")(x), gm(x), atol=1e-5, rtol=1e-4)


def _same_groups(a: geta_fx.GetaModule, b: geta_fx.GetaModule) -> None:
    assert len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups):
        assert repr(ga) == repr(gb)
        assert (ga.num_units, ga.unit_size, ga.unit_offset, ga.nodes) == \
            (gb.num_units, gb.unit_size, gb.unit_offset, gb.nodes)
        for ma, mb in zip(ga.members, gb.members):
            assert (ma.fqn, ma.dim, ma.role) == (mb.fqn, mb.dim, mb.role)
            assert torch.equal(ma.indices, mb.indices) and torch.equal(ma.units, mb.units)


@pytest.mark.parametrize("training", [True, False])
def test_pickle_round_trip(training: bool) -> None:
    import pickle

    x = torch.randn(4, 3, 8, 8)
    gm = geta_fx.transform(DropBN().eval(), (x,), quantize="weight_act")
    gm.zero_units(0, [1, 4])
    gm.train(training)
    back = pickle.loads(pickle.dumps(gm))
    assert isinstance(back, geta_fx.GetaModule) and back.training is training
    _same_groups(gm, back)
    assert back.quantizers.keys() == gm.quantizers.keys()
    for name, q in gm.quantizers.items():
        assert type(back.quantizers[name]) is type(q)
    sa, sb = gm.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # tensors, and the quantizers' extra state (their ``signed`` flags)
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
    # the same nodes (the input guard included) with their metadata, and fresh fake values
    nodes = {n.name: n for n in gm.graph_module.graph.nodes}
    assert [n.name for n in back.graph_module.graph.nodes] == list(nodes)
    for n in back.graph_module.graph.nodes:
        orig = nodes[n.name]
        assert (n.op, n.target, str(n.args), str(n.kwargs)) == \
            (orig.op, orig.target, str(orig.args), str(orig.kwargs))
        for key in ("geta.group", "geta.quantizer", "geta.origin"):
            assert n.meta.get(key) == orig.meta.get(key)
        if n.op != "output" and n.users:  # every value (the guard call returns none)
            assert "val" in n.meta, n.name
    gm.eval()
    back.eval()
    torch.testing.assert_close(back(x), gm(x))
    torch.testing.assert_close(back(torch.randn(6, 3, 8, 8)).shape, torch.Size([6, 2]))  # dyn. batch
    slim, slim_back = gm.compress(), back.compress()
    assert slim_back.conv.weight.shape[0] == 4
    torch.testing.assert_close(slim_back(x), slim(x))
    assert back(torch.randn(4, 3, 9, 9)).shape == (4, 2)  # spatial dims stay dynamic
    with pytest.raises(geta_fx.InputError, match="'x' dim 1 has size 4"):
        back(torch.randn(4, 4, 8, 8))  # static sizes are still checked
    again = pickle.loads(pickle.dumps(back))  # a rebuilt module pickles again
    torch.testing.assert_close(again(x), gm(x))


def test_torch_save_load_and_qasso_on_the_loaded_module(tmp_path) -> None:
    from geta_fx.testing.models import CharGPT

    torch.manual_seed(0)
    idx = torch.randint(0, 20, (2, 8))
    gm = geta_fx.transform(CharGPT(20, block=8, d=16, heads=2, layers=1).eval(), (idx,),
                           quantize="weight")
    torch.save(gm, tmp_path / "gm.pt")
    back = torch.load(tmp_path / "gm.pt", weights_only=False)
    torch.testing.assert_close(back(idx), gm(idx))
    _same_groups(gm, back)
    opt = geta_fx.QASSO(back, variant="adam", lr=1e-2)
    assert opt.layout.signature() == geta_fx.QASSO(gm, variant="adam", lr=1e-2).layout.signature()
    back.train()
    loss = back(idx).square().mean()
    loss.backward()
    opt.step()


def test_copy_and_deepcopy_keep_the_exported_graph_module() -> None:
    import copy

    x = torch.randn(2, 3, 8, 8)
    gm = geta_fx.transform(DropBN().eval(), (x,))
    deep = copy.deepcopy(gm)
    assert deep.graph_module is not gm.graph_module
    assert hasattr(deep.graph_module, "_guards_fn")  # not the pickle path
    assert deep.graph_module.code == gm.graph_module.code
    torch.testing.assert_close(deep(x), gm(x))
    shallow = copy.copy(gm)
    assert shallow.graph_module is gm.graph_module


def test_compress_copy_and_lower_emit_no_torch_leafspec_warning() -> None:
    """torch 2.13 warns `isinstance(treespec, LeafSpec) is deprecated` on every deepcopy of an
    exported GraphModule; geta_fx's own copies (compress, lower, deepcopy(gm)) must not."""
    import copy
    import warnings

    gm = geta_fx.transform(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
                           (torch.randn(2, 4),), quantize="weight")
    gm.zero_units(0, [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        gm.compress()
        gm.compress(lower=True)
        copy.deepcopy(gm)
