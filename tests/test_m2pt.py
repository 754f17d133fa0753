"""M2PT (Multimodal Pathway): pathway linears, whole-model helpers, the seed README snippets."""

import copy

import pytest
import torch
from torch import nn

from mammut import MaMMUT, ViT
from mammut.layers import TransformerBlock
from mammut.transforms.m2pt import (
    CrossModalReparameterization,
    MPTransformerBlock,
    add_pathways,
    merge_pathways,
    pathway_scales,
    select_linears,
)


def vit(**kw):
    cfg = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, dim_head=16)
    cfg.update(kw)
    return ViT(**cfg)


def train_steps(model, inputs, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        out = model(*inputs)
        loss = (out if torch.is_tensor(out) else out[0]).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- CrossModalReparameterization
def test_pathway_linear_computes_w_plus_lambda_w_aux_with_target_bias():
    orig, aux = nn.Linear(8, 5), nn.Linear(8, 5)
    x = torch.randn(3, 4, 8)
    layer = CrossModalReparameterization(orig, aux, lambda_init=0.0)
    assert torch.equal(layer(x), orig(x))  # lambda = 0: exactly the target
    layer = CrossModalReparameterization(orig, aux, lambda_init=0.3)
    expected = x @ (orig.weight + 0.3 * aux.weight).T + orig.bias  # aux bias unused
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight is orig.weight and layer.bias is orig.bias
    assert layer.aux_weight is not aux.weight  # a copy: the auxiliary model is never trained


def test_merge_parameters_returns_a_plain_linear_and_merges_in_place():
    orig, aux = nn.Linear(8, 5), nn.Linear(8, 5, bias=False)
    layer = CrossModalReparameterization(orig, aux, lambda_init=0.7)
    x = torch.randn(6, 8)
    before = layer(x).detach()
    linear = layer.merge_parameters()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), before, atol=1e-6, rtol=0)
    # the seed README call pattern ignores the return value: the module itself is merged now
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    assert set(layer.state_dict()) == set(nn.Linear(8, 5).state_dict())
    assert layer.merge_parameters().weight is linear.weight  # idempotent: no second fold
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)


def test_gradients_reach_lambda_and_aux_weight_and_aux_can_be_frozen():
    orig, aux = nn.Linear(8, 5), nn.Linear(8, 5)
    layer = CrossModalReparameterization(orig, aux)
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert layer.cross_modal_scale.grad is not None and layer.cross_modal_scale.grad.abs() > 0
    # d out / d W_aux = lambda * ..., zero while lambda is still 0; non-zero once it moved
    assert torch.count_nonzero(layer.aux_weight.grad) == 0
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer.zero_grad()
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert layer.cross_modal_scale.item() != 0 and layer.aux_weight.grad.abs().sum() > 0
    frozen = CrossModalReparameterization(nn.Linear(8, 5), nn.Linear(8, 5), lambda_init=0.5, aux_trainable=False)
    frozen(torch.randn(4, 8)).sum().backward()
    assert frozen.aux_weight.grad is None and frozen.cross_modal_scale.grad is not None


def test_pathway_linear_errors():
    with pytest.raises(ValueError, match=r"auxiliary_linear.*\(5, 8\).*\(5, 9\)"):
        CrossModalReparameterization(nn.Linear(8, 5), nn.Linear(9, 5))
    with pytest.raises(TypeError, match="original_linear"):
        CrossModalReparameterization(nn.Conv1d(8, 5, 1), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="lambda_init"):
        CrossModalReparameterization(nn.Linear(8, 5), nn.Linear(8, 5), lambda_init=float("nan"))


# ---------------------------------------------------------------- whole models
def test_add_pathways_on_our_vit_lambda_zero_train_merge():
    target, auxiliary = vit(), vit()
    aux_state = copy.deepcopy(auxiliary.state_dict())
    x = torch.randn(2, 3, 16, 16)
    ref = target(x)
    names = add_pathways(target, auxiliary)
    assert names == [f"blocks.{i}.{l}" for i in range(2) for l in ("attn.to_qkv", "attn.to_out", "ff.proj_in", "ff.proj_out")]
    assert torch.equal(target(x), ref)  # lambda = 0: exactly the target

    train_steps(target, (x,))
    scales = pathway_scales(target)
    assert len(scales) == 8 and all(s != 0 for s in scales.values())
    wrapped = target.blocks[0].attn.to_qkv
    assert not torch.equal(wrapped.aux_weight, auxiliary.blocks[0].attn.to_qkv.weight)  # W_aux trained
    for k, v in auxiliary.state_dict().items():  # ... but the auxiliary model untouched
        assert torch.equal(v, aux_state[k])

    target.eval()
    unmerged = target(x)
    merge_pathways(target)
    assert not any(isinstance(m, CrossModalReparameterization) for m in target.modules())
    torch.testing.assert_close(target(x), unmerged, atol=1e-6, rtol=0)
    # no inference cost: a plain ViT of the target's config loads the merged weights
    plain = vit().eval()
    plain.load_state_dict(target.state_dict())
    assert n_params(plain) == n_params(target)
    torch.testing.assert_close(plain(x), unmerged, atol=1e-6, rtol=0)


def test_add_pathways_on_a_timm_vit():
    timm = pytest.importorskip("timm")

    def make():
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
        )

    target, auxiliary = make().eval(), make()
    x = torch.randn(2, 3, 32, 32)
    ref = target(x)
    names = add_pathways(target, auxiliary)
    assert names == [f"blocks.{i}.{l}" for i in range(2) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert torch.equal(target(x), ref)
    target.train()
    train_steps(target, (x,))
    target.eval()
    unmerged = target(x)
    merge_pathways(target)
    torch.testing.assert_close(target(x), unmerged, atol=1e-6, rtol=0)
    assert n_params(target) == n_params(make())


def test_pair_by_order_pairs_differently_named_models():
    timm = pytest.importorskip("timm")
    # our ViT (no biases) and a timm ViT of the same shape: same linears, different names
    target = vit(image_size=32, patch_size=8)
    auxiliary = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    with pytest.raises(ValueError, match="blocks.0.attn.to_qkv"):
        add_pathways(target, auxiliary)  # by name there is no such layer in timm
    names = add_pathways(target, auxiliary, pair_by="order", lambda_init=0.5)
    assert len(names) == 8
    torch.testing.assert_close(target.blocks[1].ff.proj_out.aux_weight, auxiliary.blocks[1].mlp.fc2.weight)


def test_add_pathways_on_the_mammut_decoder():
    def make():
        return MaMMUT(
            dim=32, num_tokens=50, depth=2, heads=2, dim_head=16, cross_attend_every=2,
            vit=dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, dim_head=16),
        )

    target, auxiliary = make().eval(), make()
    text, images = torch.randint(1, 50, (2, 6)), torch.randn(2, 3, 16, 16)
    ref = target(text, images)
    names = add_pathways(target, auxiliary, layer_names=r"layers\..*")  # the text decoder only
    assert "layers.1.cross.attn.to_kv" in names and not any(n.startswith("img_encoder") for n in names)
    assert torch.equal(target(text, images), ref)
    target.train()
    opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
    for _ in range(2):
        loss = target(text, images, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    target.eval()
    unmerged = target(text, images)
    merge_pathways(target)
    torch.testing.assert_close(target(text, images), unmerged, atol=1e-6, rtol=0)


def test_layer_selection_forms():
    model = vit()
    assert [n for n, _ in select_linears(model, ["attn.to_qkv"])] == ["blocks.0.attn.to_qkv", "blocks.1.attn.to_qkv"]
    assert [n for n, _ in select_linears(model, r"blocks\.1\.ff\..*")] == ["blocks.1.ff.proj_in", "blocks.1.ff.proj_out"]
    assert [n for n, _ in select_linears(model, lambda n, m: m.out_features == 32)] == ["blocks.0.attn.to_out", "blocks.0.ff.proj_out", "blocks.1.attn.to_out", "blocks.1.ff.proj_out"]
    with pytest.raises(ValueError, match="attn.nope"):
        select_linears(model, ["attn.to_out", "attn.nope"])
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        add_pathways(model, vit(), layer_names="head")


def test_mismatches_name_the_layer_and_change_nothing():
    target = vit()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"layer 'blocks.0.ff.proj_in'.*\(128, 32\).*\(64, 32\)"):
        add_pathways(target, vit(mlp_mult=2.0))
    with pytest.raises(ValueError, match="'blocks.1.attn.to_qkv'"):
        add_pathways(target, vit(depth=1))  # the auxiliary lacks block 1
    with pytest.raises(ValueError, match="first unpaired layer: 'blocks.1.attn.to_qkv'"):
        add_pathways(target, vit(depth=1), pair_by="order")
    assert not any(isinstance(m, CrossModalReparameterization) for m in target.modules())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_multihead_attention_out_proj_is_skipped_or_refused():
    def make():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False)

    names = add_pathways(make(), make())
    assert names == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    with pytest.raises(ValueError, match="MultiheadAttention"):
        add_pathways(make(), make(), layer_names=["self_attn.out_proj"])


# ---------------------------------------------------------------- MPTransformerBlock
def test_seed_readme_mp_transformer_block_snippet():
    # the seed README's first snippet, with only the import changed
    model = MPTransformerBlock(
        dim=512,
        dim_head=64,
        heads=8,
        dropout=0.1,
        ff_mult=4,
        original_linear=nn.Linear(512, 512),
        auxiliar_linear=nn.Linear(512, 512),
        ffn_original_linear=nn.Linear,
        ffn_auxiliar_linear=nn.Linear,
        ffn_original_last_linear=nn.Linear,
        ffn_aux_last_linear=nn.Linear,
    )
    x = torch.randn(1, 512, 512)
    out = model(x)
    assert out.shape == (1, 512, 512)


def test_mp_block_is_a_transformer_block_with_pathways():
    orig_out, aux_out = nn.Linear(32, 32), nn.Linear(32, 32)
    block = MPTransformerBlock(32, 16, 2, 0.0, 2, orig_out, aux_out).eval()
    wrappers = [n for n, m in block.named_modules() if isinstance(m, CrossModalReparameterization)]
    assert wrappers == ["attn.to_qkv", "attn.to_out", "ff.proj_in", "ff.proj_out"]
    assert block.attn.to_out.weight is orig_out.weight
    plain = TransformerBlock(32, heads=2, dim_head=16, ff_mult=2, bias=True).eval()
    x = torch.randn(2, 5, 32)
    state = {k: v for k, v in block.state_dict().items() if not k.endswith(("aux_weight", "cross_modal_scale"))}
    plain.load_state_dict(state)
    assert torch.equal(block(x), plain(x))  # lambda = 0
    train_steps(block, (torch.randn(2, 5, 32),))
    unmerged = block(x, causal=True)
    block.merge_parameters()
    assert not any(isinstance(m, CrossModalReparameterization) for m in block.modules())
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(plain(x, causal=True), unmerged, atol=1e-6, rtol=0)


def test_mp_block_errors():
    with pytest.raises(ValueError, match=r"original_linear.*\(32, 32\).*\(32, 16\)"):
        MPTransformerBlock(32, 16, 2, 0.0, 2, original_linear=nn.Linear(16, 32))
    with pytest.raises(TypeError, match="ffn_aux_last_linear"):
        MPTransformerBlock(32, 16, 2, 0.0, 2, ffn_aux_last_linear=lambda i, o: nn.Conv1d(i, o, 1))
    with pytest.raises(ValueError, match=r"x: expected .*\(batch, tokens, 32\)"):
        MPTransformerBlock(32, 16, 2)(torch.randn(2, 5, 16))


# ---------------------------------------------------------------- the seed README's second snippet
def test_seed_readme_cross_modal_snippet_with_hf_models_from_configs():
    """The seed README's BERT/ViT snippet, shrunk. It calls ``from_pretrained`` on the hub,
    impossible offline: the two HF models are built from small configs with random weights."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

    class TextTransformerModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig(vocab_size=1000, max_position_embeddings=64, **hf))
            self.classifier = nn.Linear(self.bert.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return self.classifier(outputs.pooler_output)

    class ImageTransformerModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = ViTModel(ViTConfig(image_size=32, patch_size=8, **hf))
            self.classifier = nn.Linear(self.vit.config.hidden_size, 2)

        def forward(self, pixel_values):
            return self.classifier(self.vit(pixel_values=pixel_values).pooler_output)

    text_model = TextTransformerModel()
    image_model = ImageTransformerModel()
    cross_modal_layer = CrossModalReparameterization(text_model.classifier, image_model.classifier)
    text_model.classifier = cross_modal_layer
    input_ids = torch.randint(0, 1000, (8, 32))
    attention_mask = torch.ones(8, 32)
    logits = text_model(input_ids, attention_mask)
    assert logits.shape == (8, 2)

    # "Train the text model as usual...", then merge
    train_steps(text_model, (input_ids, attention_mask), steps=2)
    text_model.eval()
    unmerged = text_model(input_ids, attention_mask)
    text_model.classifier.merge_parameters()
    torch.testing.assert_close(text_model(input_ids, attention_mask), unmerged, atol=1e-6, rtol=0)

    # the paper's recipe on the two HF ViT encoders: every block's q/k/v/out/FFN linears
    target, auxiliary = ViTModel(ViTConfig(image_size=32, patch_size=8, **hf)).eval(), image_model.vit
    pixels = torch.randn(2, 3, 32, 32)
    ref = target(pixel_values=pixels).last_hidden_state
    names = add_pathways(target, auxiliary)
    assert len(names) == 2 * 6 and "encoder.layer.0.attention.attention.query" in names
    assert "pooler.dense" not in names
    assert torch.equal(target(pixel_values=pixels).last_hidden_state, ref)
    merge_pathways(target)
    assert n_params(target) == n_params(auxiliary)
