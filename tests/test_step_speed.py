"""What makes a CPU training step cheaper (#26) must not change what it computes: the fast dropout drops at the
configured rate, from torch's seeded generator, with the gradient of a dropout; the frozen weights held at the
training precision give bit-identical losses and gradients under autocast and are put back as they were."""
from __future__ import annotations

import math

import pytest
import torch

from tuneforge.models.dropout import FastDropout, keep_mask, use_fast_dropout
from tuneforge.models.infer import FrozenWeightsCast
from tuneforge.training.loop import keep_freed_memory


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_drops_at_the_rate_in_every_lane_of_a_draw(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    rate = round(p * 32768) / 32768
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs((~keep).float().mean().item() - rate) < 5 * sigma
    # each 64-bit draw decides four neighbouring elements: each of the four gets the rate on its own
    lanes = (~keep).view(-1, 4).float().mean(0)
    assert torch.all((lanes - rate).abs() < 5 * sigma * 2), lanes
    # and the neighbours are independent: both of a pair dropped at rate^2
    pair = ((~keep[0::2]) & (~keep[1::2])).float().mean().item()
    assert abs(pair - rate * rate) < 5 * math.sqrt(rate * rate / (n / 2)) + 1e-4


def test_fast_dropout_is_seeded_scales_the_kept_values_and_has_a_dropouts_gradient():
    layer = FastDropout(0.25).train()
    x = torch.randn(64, 48, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), y)  # the same seed draws the same mask
    torch.manual_seed(8)
    assert not torch.equal(layer(x), y)
    kept = y != 0
    assert 0 < kept.float().mean().item() < 1
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=0, atol=1e-6)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * kept / 0.75, rtol=0, atol=1e-6)
    # bf16 activations stay bf16
    assert layer(torch.randn(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fast_dropout_is_torchs_dropout_outside_training_and_at_rate_zero():
    x = torch.randn(32, 16)
    assert torch.equal(FastDropout(0.3).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.count_nonzero(FastDropout(1.0).train()(x)) == 0


def test_use_fast_dropout_swaps_the_models_and_loras_dropout_and_changes_no_weight(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    loras = sum(1 for name, m in model.named_modules() if name.endswith("lora_dropout.default"))
    assert loras > 0 and len(exact) >= loras
    assert use_fast_dropout(model) == len(exact)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    swapped = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert all(isinstance(m, FastDropout) and m.p == 0.1 for m in swapped)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert use_fast_dropout(model) == 0  # nothing left to swap


def _lora_llama(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_holding_the_frozen_weights_changes_no_loss_or_gradient_and_puts_the_same_weights_back(tiny_llama_dir):
    model = _lora_llama(tiny_llama_dir)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the tiny Llama ties its head
    ids = torch.randint(5, 60, (3, 17))
    want_loss, want_grads = _loss_and_grads(model, ids)
    originals = {n: p for n, p in model.named_parameters()}
    frozen_linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]

    held = FrozenWeightsCast(model, "bf16")
    n = held.hold()
    assert n == len(frozen_linear) + sum(m.bias is not None for m in frozen_linear)
    assert held.hold() == n  # holding twice casts nothing more
    assert all(m.weight.dtype == torch.bfloat16 for m in frozen_linear)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA: fp32 masters
    assert base.lm_head.weight is not base.model.embed_tokens.weight  # the head its own bf16 copy while held
    assert base.model.embed_tokens.weight.dtype == torch.float32  # the lookup keeps the fp32 table, as autocast does
    got_loss, got_grads = _loss_and_grads(model, ids)
    assert torch.equal(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)

    held.release()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied again
    assert all(p is originals[name] for name, p in model.named_parameters())  # the same Parameter objects
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with FrozenWeightsCast(model, "fp32") as none:  # fp32 training: nothing to hold
        assert none.kept == []


def test_keep_freed_memory_takes_on_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True


def test_frozen_weights_off_the_cpu_are_left_to_autocast():
    """Holding keeps the fp32 originals beside the copies: on an accelerator (here the meta device stands in) that
    memory is not spent."""
    layer = torch.nn.Linear(8, 8, device="meta").requires_grad_(False)
    held = FrozenWeightsCast(layer, "bf16")
    assert held.hold() == 0 and layer.weight.dtype == torch.float32
    cpu = torch.nn.Linear(8, 8).requires_grad_(False)
    assert FrozenWeightsCast(cpu, "bf16").hold() == 2 and cpu.weight.dtype == torch.bfloat16
