"""Models against independent references: Dice vs a numpy Eq. 9, DIN vs a padded plain-PyTorch
DIN with copied weights, attention without normalisation, BaseModel's sum pooling."""

import numpy as np
import pytest
import torch

from embedding.layout import FeatureLayout
from tools.reference import ReferenceDIN, padded_inputs
from trainer.data import stream_from_config
from trainer.models import DIN, BaseModel
from trainer.models.activations import Dice, PReLU, dice_train, prelu
from trainer.models.layers import LocalActivationUnit


def numpy_dice(s, alpha, mean, var, eps=1e-8):
    p = 1 / (1 + np.exp(-(s - mean) / (np.sqrt(var) + eps)))
    return p * s + (1 - p) * alpha * s


def test_dice_matches_eq9_in_train_and_eval_mode():
    torch.manual_seed(0)
    d = Dice(6, momentum=0.1)
    d.alpha.data = torch.linspace(-0.5, 0.5, 6)
    alpha = d.alpha.detach().numpy().astype(np.float64)
    xs = [torch.randn(50, 6) * 3 + 1 for _ in range(3)]
    run_mean, run_var = np.zeros(6), np.ones(6)
    for x in xs:  # train mode: batch statistics (biased variance), running averages updated
        a = x.numpy().astype(np.float64)
        out = d(x).detach().numpy()
        np.testing.assert_allclose(out, numpy_dice(a, alpha, a.mean(0), a.var(0)), rtol=1e-5, atol=1e-6)
        run_mean = 0.9 * run_mean + 0.1 * a.mean(0)
        run_var = 0.9 * run_var + 0.1 * a.var(0, ddof=1)
    np.testing.assert_allclose(d.running_mean.numpy(), run_mean, rtol=1e-5)
    np.testing.assert_allclose(d.running_var.numpy(), run_var, rtol=1e-5)
    d.eval()  # eval mode: the moving averages, independent of the batch
    x = torch.randn(7, 6)
    out = d(x).detach().numpy()
    np.testing.assert_allclose(
        out, numpy_dice(x.numpy().astype(np.float64), alpha, run_mean, run_var), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(d(x[:1]).detach().numpy(), out[:1], rtol=1e-6)


def test_dice_constant_channel_has_finite_gradient():
    d = Dice(3)
    x = torch.ones(1, 3, requires_grad=True)  # a batch of one: zero variance
    d(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp", "aten"])
def test_prelu_against_numpy_and_finite_differences(use_kernel):
    """PReLU (trainer.models.activations: the C++ kernel and the ATen ops): values and both
    gradients against numpy's Eq. 8 in float64 (more rows than one kernel block, exact zeros
    included), finite differences, and bf16 activations against float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1100, 6))
    x[::7, 2] = 0.0
    alpha = np.linspace(-0.4, 0.6, 6)
    g = rng.normal(size=x.shape)
    m = PReLU(6, use_kernel=use_kernel).double()
    m.weight.data = torch.from_numpy(alpha)
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    np.testing.assert_allclose(y.detach().numpy(), np.where(x > 0, x, alpha * x), rtol=1e-15)
    dx, da = torch.autograd.grad(y, [xt, m.weight], torch.from_numpy(g))
    np.testing.assert_allclose(dx.numpy(), np.where(x > 0, g, alpha * g), rtol=1e-15)
    np.testing.assert_allclose(da.numpy(), np.where(x > 0, 0.0, g * x).sum(0), rtol=1e-12)
    x4 = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    a4 = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, a: prelu(s, a, use_kernel), (x4, a4))
    xb = torch.from_numpy(x).bfloat16()
    gb = torch.from_numpy(g).bfloat16()
    xb.requires_grad_()
    m32 = PReLU(6, use_kernel=use_kernel)
    m32.weight.data = torch.from_numpy(alpha).float()
    yb = m32(xb)
    assert yb.dtype == torch.bfloat16
    x64 = xb.detach().double().numpy()
    np.testing.assert_allclose(yb.double().detach().numpy(), np.where(x64 > 0, x64, alpha * x64), rtol=8e-3)
    dxb, dab = torch.autograd.grad(yb, [xb, m32.weight], gb)
    g64 = gb.double().numpy()
    np.testing.assert_allclose(dxb.double().numpy(), np.where(x64 > 0, g64, alpha * g64), rtol=8e-3)
    np.testing.assert_allclose(dab.double().numpy(), np.where(x64 > 0, 0.0, g64 * x64).sum(0), rtol=1e-4)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp", "aten"])
def test_dice_backward_against_autograd_of_eq9(use_kernel):
    """Dice's written-out training function and backward (trainer.models.activations: the C++ kernel,
    and the ATen ops of other devices) against autograd through the plain Eq. 9 with batch
    statistics, in float64, including a constant channel (variance floored at ε²) and more rows
    than one block of the kernel; and by finite differences."""
    torch.manual_seed(0)
    d = Dice(5, use_kernel=use_kernel).double()
    d.alpha.data = torch.linspace(-0.7, 0.4, 5, dtype=torch.float64)
    x = torch.randn(1300, 5, dtype=torch.float64) * 2 + 0.5
    x[:, 3] = 1.5  # constant: zero variance
    g = torch.randn(1300, 5, dtype=torch.float64)

    def plain(s, alpha, eps=1e-8):
        mean, var = s.mean(0), s.var(0, unbiased=False)
        p = torch.sigmoid((s - mean) / (var.clamp_min(eps**2).sqrt() + eps))
        return s * (p + (1 - p) * alpha)

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    alpha = d.alpha.detach().clone().requires_grad_()
    want_y = plain(xa, alpha)
    got_y = d(xb)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(want_y, [xa, alpha], g)
    got = torch.autograd.grad(got_y, [xb, d.alpha], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    alpha4 = torch.tensor([-0.3, 0.2, 0.9, 0.0], dtype=torch.float64, requires_grad=True)
    x4 = x[:40, [0, 1, 2, 4]].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, a: dice_train(s, a, 1e-8, use_kernel)[0], (x4, alpha4))


def test_dice_kernel_on_bfloat16_against_float64():
    """Under bf16 autocast Dice gets bfloat16 activations and returns bfloat16, computing in float:
    the kernel's output and gradients against float64 on the same (bf16-rounded) values, to
    bf16 rounding (statistics and ∂L/∂α, reduced in float, to float rounding)."""
    torch.manual_seed(1)
    x = (torch.randn(3000, 7) * 3 - 1).bfloat16()
    alpha = torch.linspace(-0.5, 0.5, 7)
    g = torch.randn(3000, 7).bfloat16()
    y, mean, var, _ = dice_train(x, alpha, 1e-8)
    assert y.dtype == torch.bfloat16
    y64, mean64, var64, _ = dice_train(x.double(), alpha.double(), 1e-8)
    torch.testing.assert_close(y.double(), y64, rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-6)
    xs, a32 = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    x64, a64 = x.double().requires_grad_(), alpha.double().requires_grad_()
    got = torch.autograd.grad(dice_train(xs, a32, 1e-8)[0], [xs, a32], g)
    want = torch.autograd.grad(dice_train(x64, a64, 1e-8)[0], [x64, a64], g.double())
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], rtol=8e-3, atol=1e-4)  # ds rounded to bf16
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-3)


def test_dice_passes_an_empty_batch_through():
    d = Dice(3)
    out = d(torch.zeros(0, 3))
    assert out.shape == (0, 3)
    assert torch.equal(d.running_mean, torch.zeros(3)) and torch.equal(d.running_var, torch.ones(3))


def _din(tiny_cfg, *overrides):
    cfg = tiny_cfg(*overrides)
    layout = FeatureLayout.from_config(cfg)
    torch.manual_seed(1)
    model = DIN(layout, cfg.model, 0)
    for t in model.sparse.ec.embeddings.values():
        torch.nn.init.normal_(t.weight, std=0.5)
    return cfg, layout, model


def test_din_equals_padded_reference_for_any_padding(tiny_cfg):
    cfg, layout, din = _din(
        tiny_cfg,
        "model.activation=prelu",
        "tables=[{name: item, num_rows: 500, dim: 8, "
        "features: [item_id, hist_item_id]}, {name: cate, num_rows: 20, dim: 8, "
        "features: [cate_id, hist_cate_id]}]",
    )
    ref = ReferenceDIN(layout, cfg.model)
    ref.load_from(din)
    din.eval(), ref.eval()
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    assert batch.sparse.lengths().min() < cfg.data.max_hist_len  # real padding happens
    with torch.no_grad():
        ours = din(batch)
        for pad in (0, cfg.data.max_hist_len + 7, 60):
            np.testing.assert_allclose(
                ref(*padded_inputs(batch, layout, pad)).numpy(), ours.numpy(), rtol=1e-5, atol=1e-6
            )


def test_din_output_per_row_does_not_depend_on_batch_mates(tiny_cfg):
    cfg, layout, din = _din(tiny_cfg)
    din.eval()
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    cfg1 = tiny_cfg("data.batch_size=1")
    with torch.no_grad():
        whole = din(batch)
        singles = [din(b) for _, b in zip(range(5), stream_from_config(cfg1, "test").epoch(0), strict=False)]
    np.testing.assert_allclose(torch.cat(singles).numpy(), whole[:5].numpy(), rtol=1e-5, atol=1e-6)


def test_attention_is_not_normalised():
    torch.manual_seed(0)
    lau = LocalActivationUnit(4, [8], "prelu").eval()
    h = torch.randn(1, 4)
    cand = torch.randn(1, 4)
    once = lau(h, cand, torch.tensor([1]))
    twice = lau(torch.cat([h, h]), cand, torch.tensor([2]))
    w = lau.mlp(torch.cat([h, cand, h - cand, h * cand], 1))
    torch.testing.assert_close(once, w * h)  # weight used as is, no softmax
    torch.testing.assert_close(twice, 2 * once)  # a duplicated behaviour counts twice
    assert not torch.allclose(twice, once)


@pytest.mark.parametrize("act", ["prelu", "dice"])
def test_attention_equals_the_mlp_on_the_concatenated_input(act):
    """The split first layer is the paper's MLP([e, v, e − v, e ⊙ v]): values and gradients."""
    torch.manual_seed(0)
    lau = LocalActivationUnit(3, [5, 4], act).double().train()
    hist = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 0, 3])

    def naive():
        c = cand.repeat_interleave(lengths, 0)
        w = lau.mlp(torch.cat([hist, c, hist - c, hist * c], 1))
        return torch.zeros_like(cand).index_add(0, torch.arange(3).repeat_interleave(lengths), w * hist)

    def value_and_grads(f):
        out = f()
        weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
        return out.detach(), *torch.autograd.grad((out * weights).sum(), [hist, cand, *lau.parameters()])

    for got, want in zip(value_and_grads(lambda: lau(hist, cand, lengths)), value_and_grads(naive), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_dice_statistics_cover_real_behaviours_only():
    torch.manual_seed(0)
    lau = LocalActivationUnit(3, [5], "dice")
    hist, cand, lengths = torch.randn(6, 3), torch.randn(2, 3), torch.tensor([4, 2])
    lau(hist, cand, lengths)
    c = cand.repeat_interleave(lengths, 0)
    first = lau.mlp[0](torch.cat([hist, c, hist - c, hist * c], 1)).detach()  # the 6 real rows
    torch.testing.assert_close(lau.mlp[1].running_mean, 0.01 * first.mean(0))


def test_din_changes_with_a_duplicated_relevant_behaviour(tiny_cfg):
    cfg, layout, din = _din(tiny_cfg, "model.activation=prelu")
    din.eval()
    batch = next(iter(stream_from_config(cfg, "test", shuffle=False).epoch(0)))
    jt = batch.sparse.to_dict()
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # row 0's candidate appended to its own history once more
    keys = batch.sparse.keys()
    values, lengths = [], []
    for k in keys:
        v, ln = jt[k].values(), jt[k].lengths().clone()
        if k.startswith("hist_"):
            cand = jt[k[5:]].values()[0:1]
            v = torch.cat([v[: ln[0]], cand, v[ln[0] :]])
            ln[0] += 1
        values.append(v), lengths.append(ln)
    batch2 = type(batch)(
        KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)),
        batch.dense,
        batch.labels,
        batch.users,
        pooled=batch.pooled,
    )
    with torch.no_grad():
        a, b = din(batch), din(batch2)
    assert abs(float(a[0] - b[0])) > 1e-4
    torch.testing.assert_close(a[1:], b[1:])


def test_base_model_sum_pools_the_history(tiny_cfg):
    cfg = tiny_cfg("model.name=base")
    layout = FeatureLayout.from_config(cfg)
    assert layout.history_pooled and not layout.seq_tables  # every table pooled, by FBGEMM
    model = BaseModel(layout, cfg.model, 0).eval()
    assert model.sparse.ec is None
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    assert batch.sparse.keys() == [] and batch.pooled is not None
    x = model.lookups(batch)
    assert x.hist is None and x.hist_sum is not None
    jt = batch.pooled.to_dict()
    emb = model.sparse.ebc.embedding_bags
    rows, rows_c = jt["hist_item_id"].to_dense(), jt["hist_cate_id"].to_dense()
    for r in range(len(batch)):
        expect = torch.cat([emb["item"].weight[rows[r]].sum(0), emb["cate"].weight[rows_c[r]].sum(0)])
        torch.testing.assert_close(x.hist_sum[r], expect)
        cand = torch.cat([emb["item"].weight[jt["item_id"].values()[r]], emb["cate"].weight[jt["cate_id"].values()[r]]])
        torch.testing.assert_close(x.cand[r], cand)
    user = emb["user"].weight
    assert x.pooled.shape == (len(batch), 4)  # the user feature only: the candidate and history are apart
    torch.testing.assert_close(x.pooled[3], user[batch.pooled["user_id"].values()[3]])


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_bf16_autocast_tower_against_float64(tiny_cfg, activation):
    """model.precision=bf16: the tower under bfloat16 autocast, fp32 weights and outputs. Its loss
    and gradients against the same model in float64, within bf16's rounding: loss to 1e-2
    relative, each parameter's gradient to 10 % in norm (‖g − g64‖ / ‖g64‖; seen: at most 5.5 %,
    the attention's first bias, a sum over every behaviour in bf16; most below 1 %)."""
    from trainer.step import training_loss

    cfg, _, bf16 = _din(tiny_cfg, f"model.activation={activation}", "model.precision=bf16")
    _, _, f64 = _din(tiny_cfg, f"model.activation={activation}")
    f64.load_state_dict(bf16.state_dict())
    f64.tower.double()
    batch = next(iter(stream_from_config(cfg, "train").epoch(0)))
    bf16.train(), f64.train()
    loss = training_loss(bf16, batch)
    assert loss.dtype == torch.float32
    x = f64.lookups(batch)
    x = type(x)(*(t.double() if t is not None and t.is_floating_point() else t for t in x))
    logits = f64.tower(x, batch.dense.double())
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.double())
    assert abs(float(loss) - float(want)) <= 1e-2 * float(want)
    got_g = torch.autograd.grad(loss, list(bf16.tower.parameters()))
    want_g = torch.autograd.grad(want, list(f64.tower.parameters()))
    errors = []
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == torch.float32  # master weights and their gradients stay fp32
        errors.append(float((g.double() - w).norm() / w.norm().clamp_min(1e-30)))
    assert max(errors) <= 0.1, errors
    assert max(errors) > 1e-4  # bf16 did run (fp32 against float64: about 1e-6)


def test_rows_linear_pads_under_bf16_autocast_without_changing_the_result():
    from trainer.models.layers import BF16_ROWS, rows_linear

    torch.manual_seed(0)
    x = torch.randn(BF16_ROWS + 37, 24, requires_grad=True)
    w, b = torch.randn(16, 24, requires_grad=True), torch.randn(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = rows_linear(x, w, b), torch.nn.functional.linear(x, w, b)
    assert got.shape == want.shape == (BF16_ROWS + 37, 16) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    g = torch.randn_like(got, dtype=torch.float32)
    gg = torch.autograd.grad((got.float() * g).sum(), [x, w, b])
    gw = torch.autograd.grad((want.float() * g).sum(), [x, w, b])
    for a, c in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, c, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(rows_linear(x, w, b), torch.nn.functional.linear(x, w, b))  # fp32: F.linear


@pytest.mark.parametrize("name,activation", [("din", "dice"), ("dien", "prelu")])
def test_compiled_tower_against_eager_float64(tiny_cfg, name, activation):
    """model.compile: the tower through torch.compile (dynamic shapes) against the same weights run
    eagerly in float64, on two batches of different shapes (one graph for both) and in evaluation
    (Dice's moving averages): logits to 1e-4, gradients to 1e-4 relative in norm (fp32 rounding;
    the compiled graph reorders sums), Dice's running statistics updated alike."""
    from trainer.models import MODELS

    cfg = tiny_cfg(f"model.name={name}", f"model.activation={activation}", "model.compile=true")
    layout = FeatureLayout.from_config(cfg)
    torch.manual_seed(1)
    compiled = MODELS[name](layout, cfg.model, 0)
    eager = MODELS[name](layout, tiny_cfg(f"model.name={name}", f"model.activation={activation}").model, 0)
    eager.load_state_dict(compiled.state_dict())
    eager.tower.double()
    stream = iter(stream_from_config(cfg, "train").epoch(0))
    batches = [next(stream), next(stream)]
    assert batches[0].sparse.values().numel() != batches[1].sparse.values().numel()
    torch._dynamo.reset()
    for mode in ("train", "train", "eval"):
        batch = batches.pop(0) if batches else next(stream)
        compiled.train(mode == "train"), eager.train(mode == "train")
        x = compiled.lookups(batch)
        out = compiled.tower(x, batch.dense)
        x64 = type(x)(*(t.detach().double() if t is not None and t.is_floating_point() else t for t in x))
        want = eager.tower(x64, batch.dense.double())
        logits, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
        torch.testing.assert_close(logits.double(), want, rtol=1e-4, atol=1e-4)
        if mode == "train":
            got_g = torch.autograd.grad(logits.sum(), list(compiled.tower.parameters()), allow_unused=True)
            want_g = torch.autograd.grad(want.sum(), list(eager.tower.parameters()), allow_unused=True)
            for g, w in zip(got_g, want_g, strict=True):
                if w is not None:
                    assert float((g.double() - w).norm() / w.norm().clamp_min(1e-12)) < 1e-4
    for (k, a), b in zip(compiled.tower.state_dict().items(), eager.tower.state_dict().values(), strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6, msg=k)


ONE_GRAPH = ("base", "lr", "wide_deep", "pnn", "deepfm", "dcn", "xdeepfm")


def _compiled_tower(cfg, static_steps: bool | None = None):
    """The tower of cfg's model compiled, run forward on two batches of different shapes; ->
    the graph breaks dynamo counted and the number of graphs."""
    from torch._dynamo.utils import counters

    from trainer.models import MODELS

    model = MODELS[cfg.model.name](FeatureLayout.from_config(cfg), cfg.model, 0)
    if static_steps is not None:
        model.tower.static_steps = static_steps
    stream = iter(stream_from_config(cfg, "train").epoch(0))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # two batch shapes, one graph (dynamic shapes)
        batch = next(stream)
        model.tower(model.lookups(batch), batch.dense)
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name,activation", [("din", "prelu"), ("din", "dice"), *((m, "prelu") for m in ONE_GRAPH)])
def test_compiled_tower_is_one_graph(zoo_cfg, name, activation):
    """model.compile under bf16 autocast: the tower's forward compiles to one graph, without a
    graph break (the call at a break runs eagerly, every step, between two graphs)."""
    cfg = zoo_cfg(f"model.name={name}", f"model.activation={activation}", "model.compile=true", "model.precision=bf16")
    breaks, graphs = _compiled_tower(cfg)
    assert not breaks, breaks
    assert graphs == 1


@pytest.mark.parametrize("name", ["mian", "dien"])
def test_sequence_towers_compiled_break_only_at_their_kernels(zoo_cfg, name):
    """DIEN and MIAN pad the histories: on the CPU to the batch's longest (read from the batch, a
    graph break), on a GPU to data.max_hist_len (static steps, no read; set here). There MIAN's
    tower is one graph, and DIEN's breaks only around its GRU sequence kernels, which run outside
    the graph (torch.compiler.disable)."""
    cfg = zoo_cfg(f"model.name={name}", "model.compile=true", "model.precision=bf16")
    breaks, graphs = _compiled_tower(cfg, static_steps=True)
    if name == "mian":
        assert not breaks and graphs == 1, breaks
    else:
        assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks
