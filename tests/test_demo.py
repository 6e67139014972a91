"""Smoke tests of the two demos (examples/demo.py) with tiny step counts (the full demos are
not run in CI).  The demos are loaded the way ``geta-fx demo`` loads them
(:func:`geta_fx.cli.load_demos`: by path, no ``sys.path`` edit).

    run_digits / run_charlm  ->  dense + GETA runs  ->  printed table, dict of results
"""

from __future__ import annotations

import pytest

from geta_fx.cli import load_demos

demo = load_demos()
assert demo is not None, "examples/demo.py not found next to the geta_fx checkout"


def _check(res: dict, quality: str) -> None:
    dense, geta = res["dense"], res["geta"]
    assert quality in dense and quality in geta
    assert dense["relative_bops"] == pytest.approx(1.0) and dense["group_sparsity"] == 0
    assert geta["relative_bops"] < 0.2 and geta["params"] < dense["params"]
    q = res["qasso"]
    assert q["stage"] == "cooldown" and q["num_pruned"] == q["K"] > 0
    assert 4 <= geta["weight_bits_min"] <= geta["weight_bits_max"] <= 8
    assert geta["group_sparsity"] == pytest.approx(q["num_pruned"] / q["num_units"])


def test_digits_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    res = demo.run_digits(epochs=2, geta_epochs=1, width=4, progress=False)
    out = capsys.readouterr().out
    assert "test acc" in out and "BOPs vs FP32" in out and "GETA" in out
    _check(res, "accuracy")
    assert res["geta"]["accuracy"] == res["geta_uncompressed_accuracy"]


@pytest.mark.parametrize("pretrained", [True, False])
def test_charlm_smoke(capsys: pytest.CaptureFixture[str], pretrained: bool) -> None:
    res = demo.run_charlm(steps=12, geta_steps=10, pretrained=pretrained, batch_size=4,
                          block=16, d_model=16, layers=1, eval_batches=2, progress=False)
    out = capsys.readouterr().out
    assert "ppl" in out
    _check(res, "perplexity")
    assert res["geta"]["val_loss"] == pytest.approx(res["geta_uncompressed_val_loss"], abs=1e-5)
    # pretrained: GETA starts from the trained dense model, whose late-training val loss is shown
    assert ("the trained dense model (val loss" in out) == pretrained
    assert (res["dense_snapshot_val_loss"] is not None) == pretrained


def test_bad_lengths_rejected() -> None:
    with pytest.raises(ValueError, match="geta_epochs"):
        demo.run_digits(epochs=1, geta_epochs=2, progress=False)
    with pytest.raises(ValueError, match="geta_steps"):
        demo.run_charlm(steps=12, geta_steps=20, pretrained=False, progress=False)
