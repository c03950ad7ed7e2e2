"""The analysis behind notebook 01: spectrum and energy on synthetic matrices, counts on models."""

import numpy as np
import pytest
import torch

import peftkit as pk
from peftkit.studies import principles as pr


def _low_rank(rank: int, shape=(48, 32), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def test_energy_columns_are_monotone_and_end_at_one():
    df = pr.spectrum_table(torch.randn(40, 30))
    assert len(df) == 30 and list(df.k) == list(range(1, 31))
    for which in ("update", "random"):
        e = df[f"energy_{which}"].to_numpy()
        assert np.all(np.diff(e) >= -1e-12) and e[-1] == pytest.approx(1.0)
        assert np.all(np.diff(df[f"sv_{which}"].to_numpy()) <= 1e-12)  # descending


def test_rank_one_matrix_has_all_its_energy_in_one_direction():
    df = pr.spectrum_table(_low_rank(1))
    assert pr.energy_at(df, 1) == pytest.approx(1.0, abs=1e-9)
    assert pr.rank_for_energy(df, 0.999) == 1
    assert pr.energy_at(df, 1, "random") < 0.5  # the same-norm Gaussian is spread out


def test_low_rank_beats_random_of_the_same_norm():
    df = pr.spectrum_table(_low_rank(3, shape=(64, 64)) + 1e-3 * torch.randn(64, 64))
    assert pr.energy_at(df, 3) > 0.99 > pr.energy_at(df, 3, "random")
    # the random matrix was rescaled to the update's Frobenius norm
    assert (df.sv_update ** 2).sum() == pytest.approx((df.sv_random ** 2).sum(), rel=1e-9)


def test_flat_spectrum_needs_half_the_directions_for_half_the_energy():
    df = pr.spectrum_table(torch.eye(10))
    assert pr.energy_at(df, 5) == pytest.approx(0.5)
    assert pr.rank_for_energy(df, 0.5) == 5


@pytest.mark.parametrize("bad,match", [(torch.zeros(4, 4), "all zeros"), (torch.ones(4), "2-D")])
def test_spectrum_table_explains_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pr.spectrum_table(bad)


def test_energy_at_checks_its_arguments():
    df = pr.spectrum_table(torch.randn(8, 6))
    with pytest.raises(ValueError, match="between 1 and 6"):
        pr.energy_at(df, 7)
    with pytest.raises(ValueError, match="'update' or 'random'"):
        pr.energy_at(df, 1, "noise")


def test_figure_and_energy_table():
    df = pr.spectrum_table(_low_rank(2))
    fig = pr.spectrum_figure(df, r=4)
    assert len(fig.data) == 5  # update and random in two panels, and the line at r
    table = pr.energy_table(df, ranks=(1, 2, 64))
    assert list(table.r) == [1, 2]  # 64 does not fit a 48 x 32 matrix
    assert table["update"].iloc[-1] == pytest.approx(1.0)


def test_lora_count_check_on_the_tiny_model_leaves_it_untouched():
    base, _ = pk.load_base("tiny")
    df = pr.lora_count_check(base, r=4)
    assert len(df) == 4 and df.match.all()  # 2 layers x (query, value)
    assert (df.formula == 4 * (32 + 32)).all()
    assert not any(isinstance(m, pk.LoRALinear) for m in base.modules())


def test_update_spectrum_rejects_an_unknown_module_before_loading():
    with pytest.raises(ValueError, match="query"):
        pr.update_spectrum(steps=1, module="qurey")


@pytest.mark.minilm
def test_lora_count_check_on_minilm(minilm):
    df = pr.lora_count_check(minilm[0], r=8)
    assert len(df) == 12 and df.match.all()
    assert df.attrs["lora"] == 6 * 2 * 8 * (384 + 384)


@pytest.mark.minilm
def test_update_spectrum_on_minilm_few_steps():
    df = pr.update_spectrum(steps=2, n_train=64, batch_size=16, layer=1, module="value")
    assert len(df) == 384 and df.attrs["steps"] == 2
    assert df.attrs["weight"] == "bert.encoder.layer.1.attention.self.value.weight"
    assert df.energy_update.iloc[-1] == pytest.approx(1.0) and df.attrs["frobenius"] > 0
