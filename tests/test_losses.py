"""Golden and property tests for kalm.losses (book/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kalm.losses import (
    explicit_loss,
    false_negative_mask,
    implicit_loss,
    kalm_loss,
    lm_loss_from_hidden,
    response_positions,
    self_negative_mask,
)

# Cosine matrix C[i, j] = cos(hr_i, t_j) of the golden 3x3 batch; every column has unit norm, so
# hr = identity rows and t_j = column j of C realise it exactly.
C = [
    [0.8, 0.0, 0.6],
    [0.6, 0.6, 0.0],
    [0.0, 0.8, 0.8],
]
TAU, MARGIN = 0.1, 0.05


def ce(pos: float, negs: list[float]) -> float:
    """-log softmax of the positive logit against the negative logits, written out."""
    return -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(n) for n in negs)))


def golden_views() -> tuple[torch.Tensor, torch.Tensor]:
    """hr = 2 * I and t = 3 * C^T: non-unit norms so the test also checks the normalisation."""
    hr = 2.0 * torch.eye(3, dtype=torch.float64)
    t = 3.0 * torch.tensor(C, dtype=torch.float64).T
    return hr, t


def random_views(batch: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g, dtype=dtype), torch.randn(
        batch, dim, generator=g, dtype=dtype
    )


def test_golden_3x3() -> None:
    hr, t = golden_views()
    pos = [(C[i][i] - MARGIN) / TAU for i in range(3)]
    rows = [
        ce(pos[0], [0.0 / TAU, 0.6 / TAU]),
        ce(pos[1], [0.6 / TAU, 0.0 / TAU]),
        ce(pos[2], [0.0 / TAU, 0.8 / TAU]),
    ]
    cols = [
        ce(pos[0], [0.6 / TAU, 0.0 / TAU]),
        ce(pos[1], [0.0 / TAU, 0.8 / TAU]),
        ce(pos[2], [0.6 / TAU, 0.0 / TAU]),
    ]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = explicit_loss(hr, t, tau=TAU, margin=MARGIN)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_golden_3x3_masked_uses_transpose_for_columns() -> None:
    hr, t = golden_views()
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1, 0] = True  # t_0 is a false negative of row 1, so hr_1 is one of column 0
    pos = [(C[i][i] - MARGIN) / TAU for i in range(3)]
    rows = [
        ce(pos[0], [0.0 / TAU, 0.6 / TAU]),
        ce(pos[1], [0.0 / TAU]),
        ce(pos[2], [0.0 / TAU, 0.8 / TAU]),
    ]
    cols = [
        ce(pos[0], [0.0 / TAU]),
        ce(pos[1], [0.0 / TAU, 0.8 / TAU]),
        ce(pos[2], [0.6 / TAU, 0.0 / TAU]),
    ]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = explicit_loss(hr, t, tau=TAU, margin=MARGIN, false_negative_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mask_removing_every_negative_of_a_row() -> None:
    hr, t = golden_views()
    hr.requires_grad_(True)
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1:] = True
    pos = [(C[i][i] - MARGIN) / TAU for i in range(3)]
    rows = [
        -math.log(1.0),  # only the positive is left in row 0
        ce(pos[1], [0.6 / TAU, 0.0 / TAU]),
        ce(pos[2], [0.0 / TAU, 0.8 / TAU]),
    ]
    cols = [
        ce(pos[0], [0.6 / TAU, 0.0 / TAU]),
        ce(pos[1], [0.8 / TAU]),
        ce(pos[2], [0.0 / TAU]),
    ]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = explicit_loss(hr, t, tau=tau, margin=MARGIN, false_negative_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert torch.isfinite(hr.grad).all()
    assert torch.isfinite(tau.grad).all()


def test_self_negative_adds_one_column_to_rows_only() -> None:
    hr, t = golden_views()
    a = [0.5, -0.2, 0.9]  # cos(hr_i, extra_i)
    extra = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        extra[i, i] = a[i]
        extra[i, (i + 1) % 3] = math.sqrt(1 - a[i] ** 2)
    extra_mask = torch.tensor([False, True, False])
    pos = [(C[i][i] - MARGIN) / TAU for i in range(3)]
    rows = [
        ce(pos[0], [0.0 / TAU, 0.6 / TAU, a[0] / TAU]),
        ce(pos[1], [0.6 / TAU, 0.0 / TAU]),  # row 1's self-negative dropped by extra_mask
        ce(pos[2], [0.0 / TAU, 0.8 / TAU, a[2] / TAU]),
    ]
    cols = [
        ce(pos[0], [0.6 / TAU, 0.0 / TAU]),
        ce(pos[1], [0.0 / TAU, 0.8 / TAU]),
        ce(pos[2], [0.6 / TAU, 0.0 / TAU]),
    ]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = explicit_loss(
        hr, t, tau=TAU, margin=MARGIN, extra_negatives=5.0 * extra, extra_mask=extra_mask
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("self_negatives", [False, True])
def test_gradcheck_learnable_tau(masked: bool, self_negatives: bool) -> None:
    hr, t = random_views(4, 5, seed=0)
    extra = random_views(4, 5, seed=1)[0]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    if masked:
        mask[0, 1] = mask[0, 2] = mask[0, 3] = mask[2, 1] = True
    extra_mask = torch.tensor([False, True, False, False])

    def f(hr, t, tau, extra):
        return explicit_loss(
            hr,
            t,
            tau=tau,
            margin=0.02,
            false_negative_mask=mask if masked else None,
            extra_negatives=extra if self_negatives else None,
            extra_mask=extra_mask if self_negatives else None,
        )

    inputs = (
        hr.requires_grad_(),
        t.requires_grad_(),
        torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
        extra.requires_grad_(),
    )
    assert torch.autograd.gradcheck(f, inputs)


def test_learnable_tau_with_mask_finite_grads_fp32() -> None:
    hr, t = random_views(6, 8, seed=2, dtype=torch.float32)
    hr.requires_grad_(True)
    log_scale = torch.tensor(math.log(100.0), requires_grad=True)  # tau = 0.01
    mask = torch.ones(6, 6, dtype=torch.bool) & ~torch.eye(6, dtype=torch.bool)
    mask[3] = False
    loss = explicit_loss(hr, t, tau=1 / log_scale.exp(), margin=0.02, false_negative_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(hr.grad).all()
    assert torch.isfinite(log_scale.grad)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(2, 7), seed=st.integers(0, 10_000), data=st.data())
def test_invariant_to_permuting_the_batch(batch: int, seed: int, data: st.DataObject) -> None:
    hr, t = random_views(batch, 4, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(batch, batch, generator=g) < 0.3) & ~torch.eye(batch, dtype=torch.bool)
    extra = random_views(batch, 4, seed + 2)[0]
    extra_mask = torch.rand(batch, generator=g) < 0.3
    perm = torch.tensor(data.draw(st.permutations(range(batch))))
    kwargs = {"tau": 0.05, "margin": 0.02}
    base = explicit_loss(
        hr, t, false_negative_mask=mask, extra_negatives=extra, extra_mask=extra_mask, **kwargs
    )
    permuted = explicit_loss(
        hr[perm],
        t[perm],
        false_negative_mask=mask[perm][:, perm],
        extra_negatives=extra[perm],
        extra_mask=extra_mask[perm],
        **kwargs,
    )
    torch.testing.assert_close(permuted, base)


def test_margin_increases_loss_and_tau_matches_formula() -> None:
    hr, t = random_views(5, 6, seed=3)
    losses = [explicit_loss(hr, t, tau=0.05, margin=m).item() for m in (0.0, 0.02, 0.1, 0.3)]
    assert losses == sorted(losses) and len(set(losses)) == 4
    # A float tau and a 0-d tensor tau are the same temperature.
    torch.testing.assert_close(
        explicit_loss(hr, t, tau=0.05, margin=0.02),
        explicit_loss(hr, t, tau=torch.tensor(0.05, dtype=torch.float64), margin=0.02),
    )
    # tau -> infinity flattens every softmax: each CE -> log(B).
    assert explicit_loss(hr, t, tau=1e9, margin=0.02).item() == pytest.approx(math.log(5))
    # tau -> 0 with dominant positives: every CE -> 0.
    eye = torch.eye(5, dtype=torch.float64)
    assert explicit_loss(eye, eye, tau=1e-3, margin=0.02).item() == pytest.approx(0.0, abs=1e-12)


def test_explicit_loss_rejects_bad_inputs() -> None:
    hr, t = random_views(3, 4, seed=4)
    with pytest.raises(ValueError, match="diagonal"):
        explicit_loss(hr, t, tau=0.05, margin=0.0, false_negative_mask=torch.eye(3).bool())
    with pytest.raises(ValueError, match="tau"):
        explicit_loss(hr, t, tau=0.0, margin=0.0)
    with pytest.raises(ValueError, match="hr_emb"):
        explicit_loss(hr, t[:2], tau=0.05, margin=0.0)
    with pytest.raises(ValueError, match="extra_mask"):
        explicit_loss(hr, t, tau=0.05, margin=0.0, extra_mask=torch.zeros(3, dtype=torch.bool))


def test_false_negative_and_self_negative_masks() -> None:
    tails = torch.tensor([5, 7, 5, 2])
    heads = torch.tensor([2, 0, 1, 7])
    known = torch.zeros(4, 8, dtype=torch.bool)
    known[0, [5, 2]] = True
    known[1, [7]] = True
    # row 2 knows nothing: its repeated tail id (column 0) must still be masked
    known[3, [2, 7]] = True
    expected = torch.tensor(
        [
            [False, False, True, True],  # t_2 = 5 and t_3 = 2 also answer query 0
            [False, False, False, False],
            [True, False, False, False],  # same tail id as the positive
            [False, True, False, False],  # t_1 = 7 answers query 3; the diagonal stays False
        ]
    )
    assert torch.equal(false_negative_mask(tails, known), expected)
    assert torch.equal(self_negative_mask(heads, known), torch.tensor([True, False, False, True]))


def test_response_positions_golden() -> None:
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    batch_idx, pos_idx = response_positions(attention_mask, torch.tensor([2, 1]))
    # row 0: real 0..3, prompt 0..1 -> positions 1, 2 predict tokens 2, 3
    # row 1: real 1..4, prompt 1    -> positions 1, 2, 3 predict tokens 2, 3, 4
    assert batch_idx.tolist() == [0, 0, 1, 1, 1]
    assert pos_idx.tolist() == [1, 2, 1, 2, 3]


def test_response_positions_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="gaps"):
        response_positions(torch.tensor([[1, 0, 1, 1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="prompt_lengths"):
        response_positions(torch.tensor([[1, 1, 1, 0]]), torch.tensor([3]))


VOCAB, EOS = 11, 10  # pad id == EOS id, as in our tokenizers


class TinyLM(nn.Module):
    """Embedding + causal running sum + LM head: context-dependent yet padding-invariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 6)
        self.lm_head = nn.Linear(6, VOCAB)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.embed(input_ids) * attention_mask.unsqueeze(-1), dim=1)


def pad(seqs: list[list[int]], side: str, pad_id: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        fill = width - len(s)
        ids.append(s + [pad_id] * fill if side == "right" else [pad_id] * fill + s)
        mask.append([1] * len(s) + [0] * fill if side == "right" else [0] * fill + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)


def reference_lm_loss(model: TinyLM, seqs: list[list[int]], prompt_lengths: list[int]) -> float:
    """Token-mean NLL of response tokens, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for s, p in zip(seqs, prompt_lengths, strict=True):
        ids = torch.tensor([s])
        logp = torch.log_softmax(model.lm_head(model.hidden(ids, torch.ones_like(ids))), -1)[0]
        for k in range(p, len(s)):  # response tokens k are predicted at position k - 1
            total -= logp[k - 1, s[k]].item()
            count += 1
    return total / count


@settings(max_examples=20, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.lists(st.integers(0, VOCAB - 2), min_size=1, max_size=5),
            st.lists(st.integers(0, VOCAB - 2), min_size=0, max_size=4),
        ),
        min_size=1,
        max_size=4,
    ),
    pad_id=st.sampled_from([EOS, 3]),
)
def test_lm_loss_ignores_prompt_and_padding(
    data: list[tuple[list[int], list[int]]], pad_id: int
) -> None:
    model = TinyLM()
    seqs = [prompt + tail + [EOS] for prompt, tail in data]
    prompt_lengths = [len(prompt) for prompt, _ in data]
    expected = reference_lm_loss(model, seqs, prompt_lengths)
    for side in ("left", "right"):
        ids, mask = pad(seqs, side, pad_id)
        got = lm_loss_from_hidden(
            model.hidden(ids, mask), model.lm_head, ids, mask, torch.tensor(prompt_lengths)
        )
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_implicit_loss_and_kalm_loss_golden() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 1])
    expected = 0.5 * (-math.log(3 / 4) - math.log(1 / 3))
    assert implicit_loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)
    assert kalm_loss(torch.tensor(2.0), torch.tensor(3.0), 0.01).item() == pytest.approx(2.03)


def test_self_negative_diagnostics_count_the_heads_that_win() -> None:
    from kalm.losses import dual_view_logits, self_negative_diagnostics

    hr = torch.eye(3)
    t = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    heads = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    # Row 0: positive cos ~0.98 vs head 0; row 1: positive 0 vs head 1 (the head wins);
    # row 2: masked (its head is a known answer).
    mask = torch.tensor([False, False, True])
    fn = torch.tensor([[False, False, False], [False, False, True], [False, True, False]])
    rows, _ = dual_view_logits(
        hr, t, tau=0.05, margin=0.0, false_negative_mask=fn, extra_negatives=heads, extra_mask=mask
    )
    d = self_negative_diagnostics(rows, margin_logit=0.0, extra_mask=mask)
    assert d["head_wins"] == pytest.approx(0.5)
    logits = torch.tensor([[0.98058, 0.0, 0.0, 0.0], [0.19612, 0.0, 0.0, 1.0]]) / 0.05
    logits[1, 2] = torch.finfo(torch.float32).min  # masked false negative
    expected = logits.softmax(1)[:, -1].mean()
    assert d["self_negative_mass"] == pytest.approx(float(expected), abs=1e-3)
    none = self_negative_diagnostics(rows, margin_logit=0.0, extra_mask=torch.ones(3).bool())
    assert math.isnan(none["head_wins"]) and math.isnan(none["self_negative_mass"])
