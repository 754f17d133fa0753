import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mammut.losses import (
    ContrastiveLoss,
    LogitScale,
    caption_loss,
    focal_contrastive_loss,
    linear_caption_loss,
    softmax_contrastive_loss,
)


def _embeds(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_softmax_contrastive_matches_reference():
    t, i = _embeds()
    scale = 10.0
    sim = scale * t @ i.t()
    b = t.shape[0]
    # reference written out with explicit log-softmax sums
    ref_t2i = -torch.stack([sim[r, r] - torch.logsumexp(sim[r], 0) for r in range(b)]).mean()
    ref_i2t = -torch.stack([sim[c, c] - torch.logsumexp(sim[:, c], 0) for c in range(b)]).mean()
    torch.testing.assert_close(softmax_contrastive_loss(t, i, scale), 0.5 * (ref_t2i + ref_i2t))


def test_focal_contrastive_matches_reference():
    t, i = _embeds()
    scale, alpha, gamma = 5.0, 0.3, 2.0
    logits = scale * t @ i.t()
    b = t.shape[0]
    total = 0.0
    for r in range(b):
        for c in range(b):
            y = 1.0 if r == c else 0.0
            p = torch.sigmoid(logits[r, c])
            p_t = p if y else 1 - p
            w = 2 * alpha if y else 2 * (1 - alpha)
            total = total + w * (1 - p_t) ** gamma * -torch.log(p_t)
    # the matrix is scored in both directions (identical entries for sigmoid), averaged
    torch.testing.assert_close(focal_contrastive_loss(t, i, scale, alpha=alpha, gamma=gamma), total / b, rtol=1e-5, atol=1e-6)


def test_focal_gamma_zero_is_weighted_sigmoid_bce():
    t, i = _embeds()
    logits = 3.0 * t @ i.t()
    bce = F.binary_cross_entropy_with_logits(logits, torch.eye(6), reduction="sum") / 6
    torch.testing.assert_close(focal_contrastive_loss(t, i, 3.0, alpha=0.5, gamma=0.0), bce)


def test_focal_sum_is_exactly_twice_mean():
    t, i = _embeds(b=7, d=5, seed=3)
    kw = dict(alpha=0.25, gamma=2.0, logit_bias=-1.5)
    mean = focal_contrastive_loss(t, i, 4.0, **kw)
    assert torch.equal(focal_contrastive_loss(t, i, 4.0, directions="sum", **kw), 2 * mean)
    assert torch.equal(focal_contrastive_loss(t, i, 4.0, directions="mean", **kw), mean)
    focal_sum = ContrastiveLoss("focal", alpha=0.25, gamma=2.0, directions="sum")
    assert torch.equal(focal_sum(t, i), 2 * ContrastiveLoss("focal", alpha=0.25, gamma=2.0)(t, i))


def _ro_vit_focal_reference(text, image, scale, bias, alpha, gamma):
    """RO-ViT's focal contrastive loss written pair by pair: L = L_I2T + L_T2I with
    L_X2Y = -(1/B) sum_i sum_j w_ij (1 - p_ij)^gamma log p_ij, p_ij = sigmoid(l_ij) for the
    matched pair (i == j) and 1 - sigmoid(l_ij) otherwise, w = 2*alpha / 2*(1-alpha)."""
    b = text.shape[0]
    directions = (
        torch.einsum("id,jd->ij", image, text) * scale + bias,  # image i against text j
        torch.einsum("id,jd->ij", text, image) * scale + bias,  # text i against image j
    )
    total = torch.zeros((), dtype=torch.float64)
    for logits in directions:
        for r in range(b):
            for c in range(b):
                q = 1 / (1 + math.exp(-float(logits[r, c])))
                p = q if r == c else 1 - q
                w = 2 * alpha if r == c else 2 * (1 - alpha)
                total += -w * (1 - p) ** gamma * math.log(p)
    return total / b


@pytest.mark.parametrize("alpha,gamma,bias", [(0.5, 1.0, 0.0), (0.3, 2.0, -2.0), (0.8, 0.5, 1.0)])
def test_focal_sum_matches_a_pair_by_pair_ro_vit_reference(alpha, gamma, bias):
    g = torch.Generator().manual_seed(7)
    t = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    i = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    ref = _ro_vit_focal_reference(t, i, 6.0, bias, alpha, gamma)
    got = focal_contrastive_loss(t, i, 6.0, alpha=alpha, gamma=gamma, logit_bias=bias, directions="sum")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(focal_contrastive_loss(t, i, 6.0, alpha=alpha, gamma=gamma, logit_bias=bias), ref / 2)


@pytest.mark.parametrize("bad", ["Sum", "avg", "", None, 2])
def test_focal_directions_rejects_bad_values(bad):
    t, i = _embeds()
    with pytest.raises(ValueError, match=r"directions: expected 'mean' or 'sum'"):
        focal_contrastive_loss(t, i, 3.0, directions=bad)
    with pytest.raises(ValueError, match=r"directions: expected 'mean' or 'sum'"):
        ContrastiveLoss("focal", directions=bad)


def test_softmax_contrastive_refuses_summed_directions():
    with pytest.raises(ValueError, match=r"directions: expected 'mean' with kind='softmax'.*got 'sum'"):
        ContrastiveLoss("softmax", directions="sum")
    t, i = _embeds()
    loss = ContrastiveLoss("softmax", directions="mean")
    torch.testing.assert_close(loss(t, i), softmax_contrastive_loss(t, i, loss.logit_scale()))


def test_caption_loss_ignores_pad_and_checks_shape():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[3, 4, 0, 0], [1, 2, 3, 5]])
    keep = labels != 0
    ref = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(caption_loss(logits, labels, pad_id=0), ref)
    with pytest.raises(ValueError, match="labels"):
        caption_loss(logits, labels[:, :3])


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
@pytest.mark.parametrize("pad_id", [0, None])
def test_linear_caption_loss_equals_logits_then_cross_entropy(chunk, pad_id):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    labels = torch.randint(1, 11, (3, 5), generator=g)
    labels[0, 2:] = 0 if pad_id == 0 else -100
    ref = caption_loss(hidden @ weight.t(), labels, pad_id=pad_id)
    out = linear_caption_loss(hidden, weight, labels, pad_id=pad_id, chunk_size=chunk)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(3 * ref, (hidden, weight)), torch.autograd.grad(3 * out, (hidden, weight))):
        torch.testing.assert_close(a, b)


def test_linear_caption_loss_is_finite_at_extreme_logits_and_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(2, 4, 8, generator=g) * 1e3).requires_grad_()
    weight = torch.randn(9, 8, generator=g)
    labels = torch.randint(1, 9, (2, 4), generator=g)
    out = linear_caption_loss(hidden, weight, labels)
    (grad,) = torch.autograd.grad(out, hidden)
    torch.testing.assert_close(out, caption_loss(hidden @ weight.t(), labels))
    assert torch.isfinite(out) and torch.isfinite(grad).all() and out > 100
    small = hidden.detach() / 1e3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = caption_loss(small @ weight.t(), labels)
        got = linear_caption_loss(small, weight, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), atol=1e-3, rtol=1e-3)


def test_linear_caption_loss_does_the_matmuls_of_logits_and_cross_entropy():
    from torch.utils.flop_counter import FlopCounterMode

    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.randint(1, 13, (2, 9))
    counts = []
    for fn in (lambda: caption_loss(hidden @ weight.t(), labels), lambda: linear_caption_loss(hidden, weight, labels, chunk_size=4)):
        with FlopCounterMode(display=False) as counter:
            fn().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 18 * 8 * 13


def test_linear_caption_loss_refuses_a_second_backward():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss = linear_caption_loss(hidden, torch.randn(5, 4), torch.ones(2, 3, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_linear_caption_loss_checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        linear_caption_loss(torch.randn(2, 4, 8), torch.randn(9, 8), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_caption_loss(torch.randn(2, 4, 8), torch.randn(9, 7), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_caption_loss(torch.randn(2, 4, 8), torch.randn(9, 8), torch.ones(2, 4, dtype=torch.long), chunk_size=0)


def test_logit_scale_init_and_clamp():
    s = LogitScale()
    assert math.isclose(s().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(10.0)
    assert s().item() == 100.0
    with pytest.raises(ValueError, match="contrastive_loss"):
        ContrastiveLoss("hinge")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, kind, t_all, i_all, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    b = t_all.shape[0] // world
    t = t_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    i = i_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss_fn = ContrastiveLoss(kind)
    loss = loss_fn(t, i)
    loss.backward()
    # DDP averages parameter gradients across ranks: do the same for the logit scale
    scale_grad = loss_fn.logit_scale.log_scale.grad.reshape(1).clone()
    dist.all_reduce(scale_grad)
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    # the global loss is the mean of the rank losses: its gradient is the local one / world
    out[rank] = (summed / world, t.grad / world, i.grad / world, scale_grad / world)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_gather_across_two_ranks_equals_one_process(kind):
    t_all, i_all = _embeds(b=8, d=6, seed=1)
    # one process, whole batch
    t1, i1 = t_all.clone().requires_grad_(True), i_all.clone().requires_grad_(True)
    loss_fn = ContrastiveLoss(kind)
    loss = loss_fn(t1, i1)
    loss.backward()
    # two gloo processes, half the batch each
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), kind, t_all, i_all, out), nprocs=2, join=True)
    loss2, tg0, ig0, sg = out[0]
    _, tg1, ig1, _ = out[1]
    torch.testing.assert_close(loss2, loss.detach(), atol=1e-6, rtol=1e-6)
    # each rank's gradient for its own rows equals the single-process gradient for those rows
    torch.testing.assert_close(torch.cat([tg0, tg1]), t1.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([ig0, ig1]), i1.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sg, loss_fn.logit_scale.log_scale.grad.reshape(1), atol=1e-6, rtol=1e-6)
