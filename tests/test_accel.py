"""fp8 layers and CUDA-graph wrappers compute what the plain modules compute (within fp8's stated error)."""

import copy

import numpy as np
from PIL import Image
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from lightbooth.accel.fp8 import E4M3_MAX, Fp8Linear, dequantize, quantize_rowwise, to_fp8
from lightbooth.accel.graphs import GraphedForwardBackward, GraphedFunction, GraphedTrainStep, _Flat
from lightbooth.accel.trace import TracedFunction
from lightbooth.generate import Generator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_rowwise_quantization_is_within_e4m3_rounding_and_uses_the_full_range():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.full((64,), E4M3_MAX))
    back = q.float() * scale
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale * 2**-9).all()  # half an ulp of 3 mantissa bits
    assert rel(back, x) < 0.03


@pytest.mark.parametrize("mode", ["fp8", "dequant"])
def test_fp8_linear_matches_its_reference_and_stays_near_the_full_precision_layer(mode):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    f8 = Fp8Linear(lin, mode)
    assert f8.weight.dtype == torch.float8_e4m3fn and not f8.weight.requires_grad
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    out = f8(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16
    w = dequantize(f8.weight, f8.weight_scale, torch.float32)
    if mode == "fp8":
        xq, xs = quantize_rowwise(x.reshape(-1, 64))
        ref = (xq.float() * xs) @ w.t() + lin.bias.float()
    else:
        ref = x.reshape(-1, 64).float() @ w.t() + lin.bias.float()
    assert rel(out.reshape(-1, 48), ref) < 1e-2  # the same arithmetic up to bf16 output rounding
    assert rel(out, lin(x)) < (0.06 if mode == "fp8" else 0.04)


@pytest.mark.parametrize("mode", ["fp8", "dequant"])
def test_fp8_linear_follows_autocast_like_nn_linear(mode):
    """Under autocast a float32 input gives an output in autocast's dtype, as nn.Linear's does: the DreamBooth
    trainer feeds float32 latents and a float32 timestep, and an fp8 layer that answered in float32 made the
    Qwen transformer's residual stream float32, doubling what gradient checkpointing keeps (26.5 GiB on an H100
    where the bf16-input loop peaks at 23.0)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    f8 = Fp8Linear(lin, mode)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = f8(x), lin(x)
    assert ref.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert rel(out, ref) < (0.06 if mode == "fp8" else 0.04)
    out.float().sum().backward()  # the gradient reaches the float32 input in its own dtype
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert f8(torch.randn(4, 64)).dtype == torch.float32  # without autocast the input's dtype, as before


def test_fp8_linear_passes_input_gradients_and_takes_a_peft_lora_in_full_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    ref = copy.deepcopy(model)
    assert to_fp8(model, mode="dequant", skip=("2",)) == 1  # the last layer stays full precision
    assert isinstance(model[0], Fp8Linear) and type(model[2]) is nn.Linear
    x = torch.randn(8, 32, requires_grad=True)
    model(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).sum().backward()
    assert rel(x.grad, x_ref.grad) < 0.04
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights=False),
                                    model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    model(torch.randn(8, 32)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


@pytest.mark.parametrize("fixture", ["qwen_dir", "sd_dir"])
def test_generator_with_fp8_weights_makes_nearly_the_same_images(fixture, request):
    path = request.getfixturevalue(fixture)
    plain = Generator.load(path, device="cpu")
    fast = Generator.load(path, device="cpu", fp8=True)
    assert any(isinstance(m, Fp8Linear) for m in fast.family.denoiser.modules())
    side = 64 if fixture == "qwen_dir" else 16
    kw = dict(steps=4, seed=3, width=side, height=side)
    img_a, img_b = (np.asarray(g("a red circle", **kw)[0], dtype=np.float32) for g in (plain, fast))
    assert np.abs(img_a - img_b).mean() < 8  # levels of 255: the same picture


def test_generate_with_fp8_and_compile_flags_compiles_the_blocks_and_draws_nearly_the_same_image(qwen_dir, tmp_path,
                                                                                                capsys):
    from lightbooth.cli import main

    def generate(*flags):
        out = tmp_path / "-".join(flags or ("plain",))
        assert main(["generate", "a red circle", "--out", str(out), "--model", str(qwen_dir), "--steps", "2",
                     "--seed", "5", *flags]) == 0
        path = capsys.readouterr()[0].split()[0]
        with Image.open(path) as im:
            return np.asarray(im, dtype=np.float32)
    plain, fast = generate(), generate("--fp8", "--compile")
    assert np.abs(plain - fast).mean() < 8  # levels of 255: the same picture
    gen = Generator.load(qwen_dir, device="cpu", compile=True)
    blocks = gen.family.denoiser.transformer_blocks
    assert all(b._compiled_call_impl is not None for b in blocks)  # compiled, and no CPU trace on top
    assert gen.family.graphed is None


def test_graph_wrappers_are_the_plain_calls_off_cuda():
    f = GraphedFunction(lambda x, y: x * 2 + y)
    x, y = torch.randn(3), torch.randn(3)
    assert torch.equal(f(x, y), x * 2 + y) and not f.graphs
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)

    def step(x):
        loss = (w * x).sum()
        loss.backward()
        opt.step()
        return loss

    train = GraphedTrainStep(step, opt)
    for _ in range(5):  # gradients are cleared before every step, so each step is -0.5 * x
        train(torch.ones(3))
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 2.5))


def _denoiser_calls():
    """The tiny SD UNet and Qwen transformer, each with the arguments its family's training loss passes."""
    from lightbooth.tiny import tiny_qwen_components, tiny_sd_components

    torch.manual_seed(0)
    unet = tiny_sd_components()["unet"].train()
    sd = ((torch.randn(2, 4, 8, 8), torch.tensor([10, 500])),
          dict(encoder_hidden_states=torch.randn(2, 7, unet.config.cross_attention_dim), return_dict=False))
    qwen = tiny_qwen_components()["transformer"].train()
    c = qwen.config
    q = ((), dict(hidden_states=torch.randn(2, 16, c.in_channels), timestep=torch.tensor([0.3, 0.8]),
                  encoder_hidden_states=torch.randn(2, 5, c.joint_attention_dim), encoder_hidden_states_mask=None,
                  img_shapes=[[(1, 4, 4)]] * 2, return_dict=False))
    return [(unet, *sd), (qwen, *q)]


@pytest.mark.parametrize("which", [0, 1], ids=["sd-unet", "qwen-transformer"])
def test_flat_form_of_a_denoiser_call_is_the_same_call(which):
    """What the training graphs record: tensors positional, the other arguments fixed, outputs a tuple."""
    module, args, kwargs = _denoiser_calls()[which]
    items = list(enumerate(args)) + list(kwargs.items())
    slots = [k for k, v in items if isinstance(v, torch.Tensor)]
    flat = _Flat(module, slots, {k: v for k, v in items if not isinstance(v, torch.Tensor)})
    out = flat(*(v for _, v in items if isinstance(v, torch.Tensor)))
    assert isinstance(out, tuple) and torch.equal(out[0], module(*args, **kwargs)[0])
    assert set(dict(flat.named_parameters())) == {f"module.{n}" for n, _ in module.named_parameters()}
    wrapped = GraphedForwardBackward(module)  # off CUDA: the module itself, gradients included
    grads = []
    for f in (module, wrapped):
        module.zero_grad(set_to_none=True)
        f(*args, **kwargs)[0].square().mean().backward()
        grads.append([p.grad for p in module.parameters()])
    assert not wrapped.graphed and sum(g is not None for g in grads[1]) > len(grads[1]) // 2
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))


@cuda
def test_graphed_forward_backward_trains_like_the_eager_module(monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 both ways: differences are summation order
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    module, args, kwargs = _denoiser_calls()[0]
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    nets = [inject_adapter_in_model(lora, copy.deepcopy(module)).cuda() for _ in range(2)]
    for n in nets:
        for name, p in n.named_parameters():
            p.requires_grad_("lora_" in name)
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD([p for p in n.parameters() if p.requires_grad], lr=0.5) for n in nets]
    graphed = GraphedForwardBackward(nets[1])
    for step in range(6):
        x = torch.randn_like(args[0]).cuda()
        t, emb = args[1].cuda(), kwargs["encoder_hidden_states"].cuda()
        for f, opt in ((nets[0], opts[0]), (graphed, opts[1])):
            opt.zero_grad()
            f(x, t, encoder_hidden_states=emb, return_dict=False)[0].square().mean().backward()
            opt.step()
    assert graphed.failed is None and len(graphed.graphed) == 1, graphed.failed
    ups = [torch.cat([p.flatten() for name, p in n.named_parameters() if "lora_B" in name]) for n in nets]
    assert ups[0].abs().max() > 0 and rel(ups[1], ups[0]) < 1e-4  # lora_B starts at zero: what was learnt


def test_a_trace_starts_with_the_second_run_of_a_shape_and_sees_weights_changed_in_place():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).requires_grad_(False)
    f = TracedFunction(net, lambda x: net(x) * 2)
    x = torch.randn(3, 8)
    f.begin_run()
    assert torch.equal(f(x), net(x) * 2) and torch.equal(f(x), net(x) * 2) and not f.traces  # one run: eager
    f.begin_run()
    assert torch.equal(f(x), net(x) * 2) and len(f.traces) == 1
    with torch.no_grad():  # what fusing a LoRA does: the traced call reads the same parameters
        net[0].weight.add_(0.5)
        net[2].weight.data = net[2].weight.data * 3
    assert torch.equal(f(x), net(x) * 2)
    y = torch.randn(5, 8)  # a new shape is eager in its first run again
    assert torch.equal(f(y), net(y) * 2) and len(f.traces) == 1 and f.failed is None


def test_a_call_that_cannot_be_traced_runs_eagerly_with_one_warning():
    f = TracedFunction(nn.Identity(), lambda x: {"not": x})  # traces must return tensors
    x = torch.randn(2)
    f(x)
    f.begin_run()
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert f(x)["not"] is x
    assert f.failed and f(x)["not"] is x and not f.traces


def test_sd_generation_on_cpu_is_traced_from_its_second_run_and_gives_the_same_images(sd_dir):
    gen = Generator.load(sd_dir, device="cpu")
    kw = dict(negative_prompt="blurry", seed=[3, 4], steps=5, guidance=7.5)
    first = [np.asarray(im) for im in gen(["a red circle", "a blue square"], **kw)]
    assert not gen.family.graphed.traces
    second = [np.asarray(im) for im in gen(["a red circle", "a blue square"], **kw)]
    assert len(gen.family.graphed.traces) == 1  # one shape: [cond; uncond] x 2 images
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    eager = Generator.load(sd_dir, device="cpu", fast=False)
    assert eager.family.graphed is None
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, eager(["a red circle", "a blue square"], **kw)))


@cuda
def test_cuda_graph_replay_equals_eager_calls():
    lin = nn.Linear(64, 64).cuda()
    f = GraphedFunction(lambda x: torch.relu(lin(x)))
    for _ in range(3):
        x = torch.randn(8, 64, device="cuda")
        assert torch.allclose(f(x), torch.relu(lin(x)))
    assert len(f.graphs) == 1 and f.failed is None


def test_gpu_benchmark_runs_tiny_on_the_cpu_and_checks_its_outputs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--repeats", "1"]) == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert "| SD batch |" in (tmp_path / "gpu.md").read_text()
    for row in r["sd"]["rows"]:  # fp32 on the CPU: lightbooth's sampler is the stock one
        assert row["eager_rel_err"] < 1e-4 and row["graphs_rel_err"] < 1e-4 and row["unet_step_flops"] > 0
    assert r["sd-train"]["loss_rel_err"] < 1e-2 and r["sd-train"]["lora_grad_rel_err"] < 0.05
    for row in r["qwen"]["rows"].values():  # bf16 both ways, then fp8 weights
        assert row["bf16_rel_err"] < 0.02 and row["fp8_rel_err"] < 0.05
    assert r["qwen"]["train_fp8"]["lora_layers"] == r["qwen"]["train_stock"]["lora_layers"] > 0
    assert r["qwen"]["train_fp8"]["lora_grad_rel_err"] < 0.15
    # the trainers' own steps (lightbooth dreambooth's prepare_denoiser + fit), every step timed
    assert r["sd-train"]["trainer_eager"]["steps"] == 10 and r["qwen"]["trainer_fp8"]["steps"] == 8
    assert r["sd-train"]["trainer_graphs"]["steps"] == 10  # off CUDA the graphs are the plain calls: same factors
    assert r["sd-train"]["trainer_graphs"]["lora_up_rel_err_vs_eager"] == 0
