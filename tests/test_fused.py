"""fused.py's Triton kernels for the embedding layer against plain torch (indexing, cat, cast and
autograd). Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so every size here is small."""
import os
import subprocess
import sys

import pytest
import torch

from ncflib import fused

pytestmark = pytest.mark.gpu  # runs on the GPU where there is one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture
def kernels():
    ok, reason = fused.available()
    if not ok:
        pytest.skip(reason)


def reference(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype):
    gmf = (mf_user[user] * mf_item[item]).to(dtype)
    return gmf, torch.cat((mlp_user[user], mlp_item[item]), dim=1).to(dtype)


def tables(n_users, n_items, F, H, dtype=torch.float32, exact=False, seed=0):
    """The four tables; `exact`: multiples of 1/8 in [-2, 2], whose products and sums (of a few
    thousand) are exact in fp32 whatever the order, so two implementations agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, width in ((n_users, F), (n_items, F), (n_users, H), (n_items, H)):
        t = (torch.randint(-16, 17, (n, width), generator=g).float() / 8 if exact
             else torch.randn(n, width, generator=g))
        out.append(t.to(DEVICE, dtype).requires_grad_())
    return out


def indices(n_users, n_items, B, seed=1, hot_item=None, hot_count=0, spare=2):
    """Index vectors leaving the last `spare` rows of each table out of the batch; `hot_item`
    occurs `hot_count` times (more than any BLOCK_P: the run is walked in tiles)."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, n_users - spare, (B,), generator=g)
    item = torch.randint(0, n_items - spare, (B,), generator=g)
    if hot_item is not None:
        item[torch.randperm(B, generator=g)[:hot_count]] = hot_item
    return user.to(DEVICE), item.to(DEVICE)


def weights(B, F, H, dtype, exact=False, seed=2):
    """Fixed upstream weights w: the loss (gmf * w_gmf).sum() + (mlp_input * w_mlp).sum() gives
    grad_gmf = w_gmf and grad_mlp_input = w_mlp."""
    g = torch.Generator().manual_seed(seed)
    draw = ((lambda *s: torch.randint(-8, 9, s, generator=g).float() / 4) if exact
            else (lambda *s: torch.randn(*s, generator=g)))
    return draw(B, F).to(DEVICE, dtype), draw(B, 2 * H).to(DEVICE, dtype)


def loss(outputs, w):
    return sum((o.float() * wo.float()).sum() for o, wo in zip(outputs, w))


# Forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize('F,H', [(8, 16), (5, 6)])
def test_forward_fp32_is_exact(kernels, F, H):
    ts = tables(13, 11, F, H)
    user, item = indices(13, 11, 100)
    got = fused.gather_inputs(user, item, *ts, torch.float32)
    want = reference(user, item, *ts, torch.float32)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize('table_dtype,dtype', [(torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float16),
                                               (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])
def test_forward_low_precision(kernels, table_dtype, dtype):
    ts = tables(13, 11, 5, 6, dtype=table_dtype)
    user, item = indices(13, 11, 100)
    gmf, mlp_input = fused.gather_inputs(user, item, *ts, dtype)
    want_gmf, want_mlp = reference(user, item, *ts, dtype)
    assert gmf.dtype == mlp_input.dtype == dtype
    # The product is formed in fp32 and cast once; the interpreter's fp32 -> bf16 cast truncates
    # where CUDA rounds to nearest: within one bf16 ulp (2^-7 relative).
    torch.testing.assert_close(gmf.float(), want_gmf.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(mlp_input.float(), want_mlp.float(), rtol=2 ** -7, atol=1e-6)
    if table_dtype == dtype:  # a same-dtype copy is exact
        assert torch.equal(mlp_input, want_mlp)


def test_empty_batch(kernels):
    ts = tables(4, 3, 5, 6)
    user = item = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    gmf, mlp_input = fused.gather_inputs(user, item, *ts, torch.float32)
    assert gmf.shape == (0, 5) and mlp_input.shape == (0, 12)
    loss((gmf, mlp_input), (gmf, mlp_input)).backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in ts)


# Backward -----------------------------------------------------------------------------------

def gradients(fn, user, item, ts, dtype, w):
    for t in ts:
        t.grad = None
    loss(fn(user, item, *ts, dtype), w).backward()
    return [t.grad for t in ts]


@pytest.mark.parametrize('F,H,dtype', [(8, 16, torch.float32), (5, 6, torch.float32),
                                       (5, 6, torch.bfloat16)])
def test_gradients(kernels, F, H, dtype):
    """Repeated rows, rows outside the batch (exactly zero), a row occurring 150 times (more
    than BLOCK_P), odd widths; bit-exact on exactly representable data, and at fp32 rounding on
    Gaussian data."""
    n_users, n_items, B = 13, 11, 400
    user, item = indices(n_users, n_items, B, hot_item=3, hot_count=150)
    for exact in (True, False):
        ts = tables(n_users, n_items, F, H, exact=exact)
        w = weights(B, F, H, dtype, exact=exact)
        got = gradients(fused.gather_inputs, user, item, ts, dtype, w)
        want = gradients(reference, user, item, ts, dtype, w)
        for g, r in zip(got, want):
            assert g.dtype == torch.float32 and g.shape == r.shape
            assert torch.equal(g[-2:], torch.zeros_like(g[-2:]))  # untouched rows
            if exact:
                assert torch.equal(g, r)
            else:
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_gradients_in_small_tiles(kernels, monkeypatch):
    """BLOCK_P forced to 4 and 3 rows a program: every run spans several tiles, and the last
    program of each side is partly past the table's end."""
    monkeypatch.setattr(fused, 'BACKWARD_BLOCK_P_MIN', 4)
    monkeypatch.setattr(fused, 'BACKWARD_BLOCK_P_MAX', 4)
    monkeypatch.setattr(fused, 'BACKWARD_BLOCK_R', 3)
    user, item = indices(13, 11, 120, hot_item=0, hot_count=30)
    ts = tables(13, 11, 5, 6, exact=True)
    w = weights(120, 5, 6, torch.float32, exact=True)
    got = gradients(fused.gather_inputs, user, item, ts, torch.float32, w)
    want = gradients(reference, user, item, ts, torch.float32, w)
    assert all(torch.equal(g, r) for g, r in zip(got, want))


def test_gradients_of_one_output(kernels):
    """Only the MLP input in the loss: the GMF tables' gradients are zero."""
    ts = tables(13, 11, 5, 6)
    user, item = indices(13, 11, 50)
    gmf, mlp_input = fused.gather_inputs(user, item, *ts, torch.float32)
    mlp_input.sum().backward()
    assert torch.equal(ts[0].grad, torch.zeros_like(ts[0]))
    assert torch.equal(ts[1].grad, torch.zeros_like(ts[1]))
    assert torch.equal(ts[2].grad, torch.bincount(user, minlength=13)[:, None].float()
                       .expand(13, 6))


def test_gradient_accumulation(kernels):
    """Two backward passes (two batches) add into .grad as torch's do."""
    ts_fused = tables(13, 11, 5, 6, exact=True)
    ts_ref = [t.detach().clone().requires_grad_() for t in ts_fused]
    for seed in (1, 2):
        user, item = indices(13, 11, 60, seed=seed)
        w = weights(60, 5, 6, torch.float32, exact=True, seed=seed)
        loss(fused.gather_inputs(user, item, *ts_fused, torch.float32), w).backward()
        loss(reference(user, item, *ts_ref, torch.float32), w).backward()
    for a, b in zip(ts_fused, ts_ref):
        assert torch.equal(a.grad, b.grad)


def test_low_precision_tables_get_gradients_in_their_dtype(kernels):
    ts = tables(13, 11, 5, 6, dtype=torch.bfloat16, exact=True)
    user, item = indices(13, 11, 40)
    w = weights(40, 5, 6, torch.bfloat16, exact=True)
    got = gradients(fused.gather_inputs, user, item, ts, torch.bfloat16, w)
    want = gradients(reference, user, item, ts, torch.bfloat16, w)
    for g, r in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=2 ** -7, atol=0)


# Adam ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('exact', [True, False])
def test_fused_adam_steps_match(kernels, exact):
    """Adam(fused=True) over the dense gradients: parameters and both moments as with torch's
    own gradients. Bit for bit after one step from exact tables (after an Adam step they are
    exact no longer, and a GPU's atomic sums of the GMF products then round in any order);
    within rounding after four, the rows outside the later batches included (their moments
    decay and the parameters keep moving as Adam's do with zero gradients)."""
    n_users, n_items, F, H, B = 13, 11, 5, 6, 80
    ts_fused = tables(n_users, n_items, F, H, exact=exact)
    ts_ref = [t.detach().clone().requires_grad_() for t in ts_fused]
    opts = [torch.optim.Adam(ts, lr=0.01, betas=(0.25, 0.5), fused=True)
            for ts in (ts_fused, ts_ref)]
    for step in range(1 if exact else 4):
        user, item = indices(n_users, n_items, B, seed=10 + step, spare=2 if step else 0)
        w = weights(B, F, H, torch.float32, exact=exact, seed=20 + step)
        for fn, ts, opt in ((fused.gather_inputs, ts_fused, opts[0]),
                            (reference, ts_ref, opts[1])):
            opt.zero_grad()
            loss(fn(user, item, *ts, torch.float32), w).backward()
            opt.step()
    check = torch.equal if exact else (
        lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6) is None)
    for a, b in zip(ts_fused, ts_ref):
        assert check(a.detach(), b.detach())
        for key in ('exp_avg', 'exp_avg_sq'):
            assert check(opts[0].state[a][key], opts[1].state[b][key])
        # The last two rows occurred in the first batch only: moments decayed, not zero.
        assert exact or opts[0].state[a]['exp_avg'][-2:].abs().min() > 0


# torch.compile and the custom ops -----------------------------------------------------------

def test_opcheck(kernels):
    """The custom op's schema, fake (meta) implementation and autograd registration."""
    ts = tables(7, 6, 5, 6)
    user, item = indices(7, 6, 30)
    torch.library.opcheck(torch.ops.ncf.gather_inputs.default,
                          (user, item, *ts, torch.bfloat16),
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


def test_compiled_matches_eager(kernels):
    """gather_inputs + a Linear, forward and backward, under torch.compile (one graph, the
    custom ops opaque inside it) equal to eager."""
    torch._dynamo.reset()
    ts = tables(13, 11, 5, 6, exact=True)
    linear = torch.nn.Linear(17, 1).to(DEVICE)
    user, item = indices(13, 11, 64)

    def step(user, item):
        gmf, mlp_input = fused.gather_inputs(user, item, *ts, torch.float32)
        return linear(torch.cat((gmf, mlp_input), dim=1)).square().sum()

    params = [*ts, *linear.parameters()]
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        for p in params:
            p.grad = None
        out = fn(user, item)
        out.backward()
        results.append((out.detach(), [p.grad.clone() for p in params]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled_grads[0][-2:], torch.zeros(2, 5, device=DEVICE))


# Availability -------------------------------------------------------------------------------

def test_available_reasons(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, 'triton', None)  # import triton raises ImportError
        assert fused.available() == (False, 'triton is not installed: pip install triton')
    pytest.importorskip('triton')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    ok, reason = fused.available()
    assert not ok and 'needs CUDA' in reason and 'TRITON_INTERPRET=1' in reason
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert fused.available() == (True, '')


def test_imports_without_triton():
    code = ('import sys; sys.modules["triton"] = None; from ncflib import fused; '
            'print(fused.available()[1])')
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'triton is not installed' in done.stdout
