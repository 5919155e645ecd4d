"""Invariants of the straightened VQ layer (docs/method.md section 2), parametrized over its options."""
import itertools
import resource

import pytest
import torch
import torch.nn.functional as F

from tokenizer import GroupVectorQuant, ResidualVectorQuant, VectorQuant
from tokenizer.estimators import l2_normalize, quantizer_tail
from tokenizer.fsq import FiniteScalarQuant
from tokenizer.kmeans import kmeans, nearest_code
from tokenizer.usage import perplexity

SGD = lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)  # noqa: E731

OPTION_SETS = [
    dict(),
    dict(norm="l2", cb_norm="l2"),
    dict(affine_lr=2.0, affine_groups=4),
    dict(running_affine=True),
    dict(sync_nu=0.5),
    dict(inplace_optimizer=SGD, beta=1.0),
    dict(kmeans_init=True, replace_freq=2),
    dict(kmeans_init=True, affine_lr=2.0, sync_nu=0.2, replace_freq=3, inplace_optimizer=SGD, beta=1.0),
]


def _train_steps(vq, n=3, shape=(4, 8, 5, 5)):
    for _ in range(n):
        loss = vq(torch.randn(shape) * 2 + 0.5)[1]["loss"]
        if loss.requires_grad:  # with alternating optimization and no affine map, nothing learns from it
            loss.backward()
        vq.zero_grad()


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_forward_value_is_effective_code_and_decode_matches(opts):
    torch.manual_seed(0)
    vq = VectorQuant(8, 32, dim=1, **opts)
    _train_steps(vq)
    z = torch.randn(4, 8, 5, 5, requires_grad=True)
    z_q, info = vq(z)
    assert z_q.shape == z.shape and info["q"].shape == (4, 5, 5)
    codebook = vq.get_codebook().detach()
    assert torch.equal(z_q.detach(), codebook[info["q"]].permute(0, 3, 1, 2))
    vq.eval()  # (in training, the in-place step moves codes after the assignment)
    z_q, info = vq(z)
    # the chosen code is the nearest one of the effective codebook
    zf = info["z"].detach().permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(zf, codebook).argmin(1)
    chosen = (zf - codebook[info["q"].reshape(-1)]).norm(dim=1)
    assert torch.allclose(chosen, (zf - codebook[brute]).norm(dim=1), atol=1e-5)
    assert torch.equal(vq.decode(info["q"]), z_q)


@pytest.mark.parametrize("nu", [0.0, 0.5, 2.0])
def test_encoder_gets_ste_gradient_and_codes_get_sync_gradient(nu):
    torch.manual_seed(1)
    vq = VectorQuant(6, 10, sync_nu=nu)
    z = torch.randn(50, 6, requires_grad=True)
    z_q, info = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()  # task loss only: no VQ loss
    assert torch.allclose(z.grad, g)  # straight-through: encoder gets exactly g
    expected = torch.zeros(10, 6).index_add_(0, info["q"], g) * nu
    if nu == 0:  # plain STE: the task gradient does not reach the codes at all
        assert vq.codebook.weight.grad is None
    else:
        assert torch.allclose(vq.codebook.weight.grad, expected, atol=1e-6)


def test_loss_is_beta_tradeoff():
    torch.manual_seed(2)
    beta = 0.8
    vq = VectorQuant(4, 16, beta=beta)
    z = torch.randn(30, 4, requires_grad=True)
    z_q, info = vq(z)
    mse = F.mse_loss(z.detach(), info["z_q"].detach())
    assert torch.allclose(info["loss"], mse)  # both terms have the same value
    info["loss"].backward()
    # encoder part: (1 - beta) * d/dz mean((z - sg zq)^2)
    assert torch.allclose(z.grad, (1 - beta) * 2 * (z - info["z_q"]).detach() / z.numel(), atol=1e-7)
    assert vq.codebook.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_fused_l2_normalize_equals_f_normalize(eps):
    """Values and gradients of F.normalize, rows below eps (a plain scaling there) and a zero row included;
    a double backward raises instead of returning a wrong second derivative."""
    x = torch.randn(40, 6, 3, dtype=torch.double)
    x[0, 0], x[1, 2] = 0.0, 1e-4
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = l2_normalize(a, eps), F.normalize(b, dim=-1, eps=eps)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(l2_normalize, (torch.randn(5, 4, dtype=torch.double, requires_grad=True),))
    y = l2_normalize(a)
    (ga,) = torch.autograd.grad((y * g).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError):
        ga.sum().backward()


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("nu", [0.0, 2.0])
@pytest.mark.parametrize("codes", ["same", "other", "none"])
@pytest.mark.parametrize("uses", ["all", "output", "loss", "codes"])
def test_fused_tail_equals_the_gather_loss_and_output_it_replaces(beta, nu, codes, uses):
    """quantizer_tail = its formulas written with autograd (the gather, the two-term loss, the output
    sg(z_q) + (z - sg(z)) + nu (z_q - sg(z_q)), the per-row distance): values and every gradient
    (encoder, the output's codebook, the loss's codebook when it is the same tensor, another one or none),
    in float64, also when the objective uses only some outputs (then no gradient at all from the others,
    not zeros). "codes" uses the plain gather, as the residual quantizer does."""
    torch.manual_seed(4)
    z0, c0 = torch.randn(50, 6, dtype=torch.double), torch.randn(10, 6, dtype=torch.double)
    q, g, h = torch.randint(0, 10, (50,)), torch.randn(50, 6, dtype=torch.double), torch.randn(50, 6, dtype=torch.double)
    results = []
    for fused in (False, True):
        z, c, c2 = (t.clone().requires_grad_() for t in (z0, c0, c0))
        loss_codebook = {"same": c, "other": c2, "none": None}[codes]
        if fused:
            out, z_q, loss, d = quantizer_tail(z, c, loss_codebook, q, beta, nu)
        else:
            z_q = c.index_select(0, q)
            zq_loss = {"same": z_q, "other": c2.index_select(0, q), "none": z_q.detach()}[codes]
            loss = (1 - beta) * F.mse_loss(z, zq_loss.detach()) + beta * F.mse_loss(z.detach(), zq_loss)
            d = (z - z_q).detach().square().sum(-1)
            out = z_q.detach() + (z - z.detach()) + nu * (z_q - z_q.detach())
        terms = {"output": (out * g).sum(), "loss": 0.7 * loss, "codes": (z_q * h).sum()}
        (sum(terms.values()) if uses == "all" else terms[uses]).backward()
        results.append((out.detach(), z_q.detach(), loss.detach(), d, z.grad, c.grad, c2.grad))
    for ref, new in zip(*results):  # autograd gives zeros where a term is weighted by 0; the tail gives none
        if new is None:
            assert ref is None or not ref.any()
        else:
            torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    z_grad, codes_grad = results[1][4], results[1][5]  # the tail's: a gradient exists exactly where one acts
    uses_out, uses_loss, uses_codes = (uses in ("all", k) for k in ("output", "loss", "codes"))
    assert (z_grad is not None) == (uses_out or uses_loss and beta != 1)
    assert (codes_grad is not None) == (uses_out and nu != 0 or uses_codes or uses_loss and codes == "same" and beta != 0)


def test_loss_per_row_distance_is_exact_squared_distance():
    z, z_q = torch.randn(300, 16), torch.randn(300, 16)
    _, _, loss, d = quantizer_tail(z, z_q, None, torch.arange(300), 0.25)  # codebook = z_q, code i for row i
    torch.testing.assert_close(d, ((z - z_q) ** 2).sum(-1))
    torch.testing.assert_close(loss, F.mse_loss(z, z_q))


def test_affine_identity_at_init_and_moves_unassigned_codes():
    torch.manual_seed(3)
    vq = VectorQuant(8, 64, affine_lr=5.0)
    assert torch.equal(vq.get_codebook(), vq.codebook.weight)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    before = vq.get_codebook().detach().clone()
    used = set()
    for _ in range(20):
        z = torch.randn(4, 8) * 0.1 + 3.0  # few vectors, far away: most codes are never assigned
        _, info = vq(z)
        used |= set(info["q"].tolist())
        opt.zero_grad()
        info["loss"].backward()
        opt.step()
    unused = sorted(set(range(64)) - used)
    assert len(unused) > 40
    moved = (vq.get_codebook().detach() - before)[unused].norm(dim=1)
    assert (moved > 1e-3).all()  # shared affine parameters move codes that received no assignment


def test_running_affine_tracks_statistics():
    torch.manual_seed(4)
    vq = VectorQuant(8, 64, running_affine=True)
    for _ in range(30):
        vq(torch.randn(256, 8) * 3 + 5)
    c = vq.get_codebook()
    assert torch.allclose(c.mean(0), torch.full((8,), 5.0), atol=0.6)
    assert torch.allclose(c.std(0), torch.full((8,), 3.0), atol=0.8)


@pytest.mark.parametrize("affine", [dict(), dict(affine_lr=3.0)])
def test_inplace_step_lowers_codebook_loss_without_stray_gradients(affine):
    torch.manual_seed(5)
    vq = VectorQuant(8, 16, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=5.0), beta=1.0, **affine)
    if affine:
        with torch.no_grad():
            vq.affine_scale.fill_(0.1)
    z = torch.randn(64, 8)
    with torch.no_grad():
        q = nearest_code(z, vq.get_codebook())
        before = F.mse_loss(vq.get_codebook()[q], z)
    pre_grad = torch.randn_like(vq.codebook.weight)
    vq.codebook.weight.grad = pre_grad.clone()  # as if a previous micro-batch had accumulated this
    z_q, info = vq(z)
    after = F.mse_loss(info["z_q"].detach(), z)
    assert torch.equal(info["q"], q) and after < before
    assert torch.equal(vq.codebook.weight.grad, pre_grad)  # the main optimizer sees no in-place grads
    if affine:
        assert vq.affine_scale.grad is None and vq.affine_bias.grad is None
    # the returned z_q comes from the updated effective codebook, not the stale one
    assert torch.equal(info["z_q"].detach(), vq.get_codebook().detach()[q])


def test_kmeans_init_beats_random_init_also_with_fewer_vectors_than_codes():
    torch.manual_seed(6)
    centers = torch.randn(16, 4) * 4
    data = centers[torch.randint(16, (512,))] + 0.1 * torch.randn(512, 4)

    def err(vq, z):
        vq.eval()
        return vq(z)[1]["d"].mean()

    for n, k in ((512, 16), (10, 32)):
        z = data[:n]
        random_vq, km_vq = VectorQuant(4, k), VectorQuant(4, k, kmeans_init=True)
        km_vq.train()(z)
        assert km_vq.codebook.weight.shape == (k, 4)  # never shrinks
        assert bool(km_vq.kmeans_done)
        assert err(km_vq, z) < 0.2 * err(random_vq, z)
    assert torch.cdist(kmeans(data, 16), centers).min(0).values.max() < 0.5  # finds every cluster


def test_dead_codes_are_revived():
    torch.manual_seed(7)
    vq = VectorQuant(4, 32, replace_freq=5, affine_lr=2.0)
    with torch.no_grad():
        vq.affine_scale.fill_(0.3)
        vq.affine_bias.fill_(-0.2)
    z_all = torch.randn(128, 4) + 10.0  # far from every initial code: one code takes everything
    _, info = vq(z_all)
    assert info["codes_used"] * 32 <= 4
    alive = info["q"].unique()
    for _ in range(4):
        vq(z_all)
    _, info = vq(z_all)  # step 6, after 5 idle steps: replacement, then assignment to the revived codes
    assert info["codes_used"] * 32 >= 20
    dead = torch.ones(32, dtype=torch.bool)
    dead[alive] = False
    # the *effective* dead codes were written near real encoder outputs (the affine map was inverted)
    assert torch.cdist(vq.get_codebook().detach()[dead], z_all).min(1).values.max() < 0.5


def test_perplexity_and_usage_match_direct_computation():
    torch.manual_seed(8)
    vq = VectorQuant(4, 8)
    _, info = vq(torch.randn(200, 4))
    counts = torch.bincount(info["q"], minlength=8).double()
    p = counts / counts.sum()
    direct = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    assert torch.allclose(info["perplexity"].double(), direct, rtol=1e-5)
    assert info["codes_used"].item() == (counts > 0).float().mean().item()
    assert perplexity(torch.ones(8)).item() == pytest.approx(8.0, rel=1e-5)


def test_fp32_under_autocast_and_bf16_input():
    torch.manual_seed(9)
    vq = VectorQuant(8, 16)
    z = torch.randn(20, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, info = vq(z)
    assert z_q.dtype == torch.bfloat16 and info["loss"].dtype == torch.float32 and info["z_q"].dtype == torch.float32


def test_chunked_search_equals_brute_force():
    torch.manual_seed(10)
    z, c = torch.randn(1000, 16), torch.randn(300, 16)
    assert torch.equal(nearest_code(z, c, chunk_elems=3000), torch.cdist(z, c).argmin(1))


@pytest.mark.parametrize("k", [64, 128, 1000, 1024, 4096])
def test_blocked_argmin_is_torch_argmin_ties_included(k):
    """row_argmin (block minima, then the first block holding the row's minimum, then inside it) returns
    torch.argmin's index: the first occurrence of the minimum, also across blocks and inside one."""
    from tokenizer.kmeans import row_argmin

    torch.manual_seed(k)
    s = torch.randn(40, k)
    s[0, [5, k - 1]] = -100.0  # a tie across blocks: the first wins
    s[1, [70 % k, 71 % k]] = -100.0  # a tie inside one block
    s[2] = 1.0  # a constant row: index 0
    s[3, [k // 2, 3]] = -7.0
    out = torch.empty(40, dtype=torch.long)
    row_argmin(s, out)
    assert torch.equal(out, torch.argmin(s, 1)) and out[2] == 0 and out[3] == 3


def test_search_chunks_are_cache_sized_on_a_cpu_and_as_large_as_allowed_elsewhere():
    """On a CPU the scores of a chunk fit the cache (2^21 scores, at least 1,024 rows); on a GPU each chunk
    costs kernel launches, so one chunk takes every row that ``chunk_elems`` allows (H200: 14x faster)."""
    from tokenizer.kmeans import search_rows

    assert search_rows(16384, 1024) == 2048 and search_rows(16384, 65536) == 256
    assert search_rows(16384, 1024, cpu=False) == 16384 and search_rows(65536, 1024, cpu=False) == 16384
    assert search_rows(100, 1024, cpu=False) == 100 and search_rows(16384, 2**25, cpu=False) == 1
    assert search_rows(16384, 1024, chunk_elems=2**20, cpu=False) == 1024


def test_chunked_search_equals_one_addmm_over_all_rows():
    """The search in chunks of 100 rows (into one reused scores buffer) ranks the codes as one addmm does."""
    torch.manual_seed(13)
    z, c = torch.randn(3000, 32), torch.randn(2048, 32)
    reference = torch.addmm(c.square().sum(1), z, c.t(), beta=1.0, alpha=-2.0).argmin(1)
    assert torch.equal(nearest_code(z, c, chunk_elems=2048 * 100), reference)


def test_large_search_never_allocates_full_matrix():
    # K = N = 65,536: the full fp32 matrix would be 16 GiB; chunked search peaks far below that.
    torch.manual_seed(11)
    z, c = torch.randn(65536, 4), torch.randn(65536, 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    q = nearest_code(z, c)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert q.shape == (65536,) and grown_gib < 1.0
    sample = torch.arange(0, 65536, 4099)
    assert torch.equal(q[sample], torch.cdist(z[sample], c).argmin(1))


@pytest.mark.parametrize("bad,exc", [
    (dict(beta=1.5), ValueError), (dict(norm="l2c"), ValueError), (dict(cb_norm="unit"), ValueError),
    (dict(affine_groups=3), ValueError), (dict(affine_lr=1.0, running_affine=True), ValueError),
    (dict(num_codes=0), ValueError),
])
def test_bad_options_raise(bad, exc):
    kwargs = dict(feature_size=8, num_codes=16) | bad
    with pytest.raises(exc) as e:
        VectorQuant(**kwargs)
    assert "got" in str(e.value)


def test_bad_inputs_raise():
    vq = VectorQuant(8, 16, dim=1)
    with pytest.raises(ValueError, match="feature size 8 on dim 1"):
        vq(torch.randn(2, 7, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(2, 8, 3, 3, dtype=torch.long))
    z = torch.randn(2, 8, 3, 3)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vq(z)


@pytest.mark.parametrize("make", [lambda: VectorQuant(8, 16, dim=1), lambda: FiniteScalarQuant(8, [3, 3, 3], dim=1)])
def test_input_check_inside_a_deferred_block_notes_instead_of_raising(make):
    """In the training loops' steps that do not log, a non-finite input is noted into the loop's device
    flag (no host read, no error); outside such a block the same input is refused at once, as before."""
    from core.finite import DeviceFlag, deferred

    vq, flag = make(), DeviceFlag()
    good, bad = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    bad[1, 2, 0, 1] = float("inf")
    with deferred(flag):
        vq(good)
    assert flag.read() is False
    with deferred(flag):
        vq(bad)  # no error here ...
        vq(good)  # ... and a later finite input does not clear the note
    assert flag.read() is True and flag.read() is False  # read once, then cleared
    with pytest.raises(ValueError, match="NaN or inf"):
        vq(bad)


@pytest.mark.parametrize("cls,share", list(itertools.product([GroupVectorQuant, ResidualVectorQuant], [True, False])))
def test_group_and_residual(cls, share):
    torch.manual_seed(12)
    stateful = dict(replace_freq=2, inplace_optimizer=SGD, beta=1.0)
    if cls is ResidualVectorQuant and share:  # refused: see test below
        stateful = dict()
    vq = cls(16, 32, groups=4, share=share, dim=1, kmeans_init=True, affine_lr=1.0, sync_nu=0.3, **stateful)
    z = torch.randn(3, 16, 4, 4, requires_grad=True)
    for _ in range(3):
        z_q, info = vq(z)
    assert z_q.shape == z.shape and info["q"].shape == (3, 4, 4, 4) and info["loss"].dim() == 0
    g = torch.randn_like(z_q)
    ((z_q * g).sum() + info["loss"]).backward()
    assert torch.isfinite(z.grad).all()
    vq.eval()
    z_q, info = vq(z)
    assert torch.allclose(vq.decode(info["q"]), z_q, atol=1e-6)
    if not share:  # every group/stage's in-place optimizer is bound to its own, live codebook
        for sub in vq.vqs:
            assert sub.inplace_optimizer.param_groups[0]["params"][0] is sub.codebook.weight
    if cls is ResidualVectorQuant and not share:  # more stages quantize better than one
        one = ResidualVectorQuant(16, 32, groups=1, dim=1, kmeans_init=True)
        one.train()(z)
        one.eval()
        assert info["d"].mean() < one(z)[1]["d"].mean()


def test_residual_shared_codebook_refuses_inplace_step():
    with pytest.raises(ValueError, match="share"):
        ResidualVectorQuant(16, 32, groups=2, share=True, inplace_optimizer=SGD, beta=1.0)
    with pytest.raises(ValueError, match="share"):
        ResidualVectorQuant(16, 32, groups=2, share=True, replace_freq=10)


def test_state_dict_round_trip_keeps_quantizer_state():
    torch.manual_seed(13)
    vq = VectorQuant(8, 16, kmeans_init=True, running_affine=True, inplace_optimizer=SGD, replace_freq=4, beta=1.0)
    _train_steps(vq, shape=(64, 8))
    state = vq.state_dict()
    fresh = VectorQuant(8, 16, kmeans_init=True, running_affine=True, inplace_optimizer=SGD, replace_freq=4, beta=1.0)
    fresh.load_state_dict(state)
    assert bool(fresh.kmeans_done) and int(fresh.step) == 3
    assert fresh.inplace_optimizer.state_dict()["state"]  # momentum restored
    z = torch.randn(10, 8)
    assert torch.equal(fresh.eval()(z)[0], vq.eval()(z)[0])


def test_kmeans_flag_is_read_on_the_host_once_not_every_step():
    """After the k-means init (or a load), a training forward with kmeans_init reads no more tensors on
    the host than one without it: the done flag is cached, re-read only after load_state_dict."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from count_syncs import count_host_reads

    reads = {}
    for km in (False, True):
        torch.manual_seed(0)
        vq = VectorQuant(8, 16, kmeans_init=km)
        vq(torch.randn(64, 8))  # step 1 (the init)
        with count_host_reads() as counts:
            for _ in range(3):
                vq(torch.randn(64, 8))
        reads[km] = sum(counts.values())
    assert reads[True] == reads[False]
    fresh = VectorQuant(8, 16, kmeans_init=True)
    fresh.load_state_dict(vq.state_dict())  # a loaded, already initialised codebook is not re-fitted
    before = fresh.codebook.weight.detach().clone()
    fresh(torch.randn(64, 8) * 5)
    assert torch.equal(fresh.codebook.weight.detach(), before)
