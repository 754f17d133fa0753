import pytest
import torch

from mammut import MaMMUT, VideoTubeConfig, VideoTubeViT, ViT
from mammut.encoders import sincos_3d

TUBES = (((4, 8, 8), (4, 16, 16), (0, 0, 0)), ((8, 4, 4), (8, 16, 16), (0, 4, 4)))


def encoder(**vit_kw):
    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=8, dim=48, depth=2, heads=2, dim_head=16, **vit_kw)
    return VideoTubeViT(vit, VideoTubeConfig(frames=8, frame_stride=4, tubes=TUBES))


def pre_blocks(enc, video):
    """The tokens that enter the ViT blocks."""
    seen = []
    hook = enc.vit.pre_norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    enc(video)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("class_token", [False, True])
def test_token_count_and_shape(class_token):
    enc = encoder(class_token=class_token)
    # 2 sampled frames x 16 patches + tube 1: 2 x 2 x 2 + tube 2: 1 x 2 x 2 (+ class token)
    assert enc.num_tokens() == 32 + 8 + 4 + int(class_token)
    assert enc(torch.randn(3, 8, 3, 32, 32)).shape == (3, enc.num_tokens(), 48)


def test_sparse_frames_use_the_image_patches_and_learned_positions_at_gate_zero():
    enc = encoder()
    video = torch.randn(2, 8, 3, 32, 32)  # (b, t, c, h, w)
    x = pre_blocks(enc, video)
    vit = enc.vit
    for j, f in enumerate((0, 4)):
        want = vit.to_patches(video[:, f]).flatten(2).transpose(1, 2) + vit.pos_emb.flatten(2).transpose(1, 2)
        torch.testing.assert_close(x[:, 16 * j:16 * (j + 1)], want)
    with torch.no_grad():
        enc.fixed_gate.fill_(0.5)
    moved = pre_blocks(enc, video)
    torch.testing.assert_close(moved[:, :32] - x[:, :32], 0.5 * enc.patch_fixed.expand(2, -1, -1))


def test_tubes_see_the_frames_the_patches_skip_and_carry_fixed_positions():
    enc = encoder().eval()
    video = torch.randn(1, 8, 3, 32, 32)
    other = video.clone()
    other[:, 1] += 1.0  # frame 1 is not one of the sampled frames (0, 4)
    a, b = pre_blocks(enc, video), pre_blocks(enc, other)
    torch.testing.assert_close(a[:, :32], b[:, :32])
    assert not torch.allclose(a[:, 32:], b[:, 32:])
    with torch.no_grad():
        for conv in enc.tubes:
            conv.weight.zero_()
            conv.bias.zero_()
    torch.testing.assert_close(pre_blocks(enc, video)[0, 32:], enc.tube_fixed)
    assert torch.cdist(enc.tube_fixed, enc.tube_fixed).fill_diagonal_(1.0).min() > 0.1  # distinct positions


def test_sincos_3d_is_distinct_per_axis_and_zero_padded():
    pts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    emb = sincos_3d(pts, 20)
    assert emb.shape == (4, 20) and (emb[:, 18:] == 0).all()
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0.1
    with pytest.raises(ValueError, match="dim"):
        sincos_3d(pts, 5)


def test_mammut_trains_and_captions_videos():
    torch.manual_seed(0)
    model = MaMMUT(dim=32, num_tokens=50, depth=2, heads=2, dim_head=16, img_encoder=encoder(), image_dim=48, bos_id=1)
    text, video = torch.randint(2, 50, (2, 6)), torch.randn(2, 8, 3, 32, 32)
    loss = model(text, video, return_loss=True)
    loss.backward()
    assert model.img_encoder.fixed_gate.grad is not None and model.img_encoder.tubes[0].weight.grad.abs().sum() > 0
    assert model.eval().generate(video, max_new_tokens=3).shape == (2, 3)


def test_bad_configs_and_inputs_are_named():
    vit = ViT(image_size=32, patch_size=8, dim=48, depth=1, heads=2, dim_head=16)
    with pytest.raises(ValueError, match=r"tubes\[0\]"):
        VideoTubeViT(vit, VideoTubeConfig(frames=4, tubes=(((8, 8, 8), (4, 4, 4), (0, 0, 0)),)))
    with pytest.raises(ValueError, match=r"tubes\[0\]"):
        VideoTubeConfig(tubes=(((0, 8, 8), (4, 4, 4), (0, 0, 0)),))
    with pytest.raises(TypeError, match="vit"):
        VideoTubeViT(torch.nn.Linear(2, 2))
    enc = encoder()
    with pytest.raises(ValueError, match=r"images \(videos\): expected .*\(batch, 8, 3, 32, 32\), got \(2, 4, 3, 32, 32\)"):
        enc(torch.randn(2, 4, 3, 32, 32))  # too few frames
    with pytest.raises(ValueError, match="images"):
        enc(torch.randn(2, 8, 3, 32, 32).unsqueeze(1))  # 6-D


def test_channels_first_videos_are_refused_with_the_fix():
    """One order for videos in the library, (b, t, c, h, w): Conv3d's (b, c, t, h, w) is internal."""
    enc = encoder()
    video = torch.randn(2, 8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected .*\(batch, 8, 3, 32, 32\), got \(2, 3, 8, 32, 32\).*channels-first"
                                         r".*transpose\(1, 2\)"):
        enc(video.transpose(1, 2))
    with pytest.raises(ValueError, match="a batch of images"):
        enc(video[:, 0])
    torch.testing.assert_close(enc(video.transpose(1, 2).transpose(1, 2)), enc(video))
    # the tubes read the frames as Conv3d's channels-first clip: one tube token by hand
    conv, ((kt, ky, kx), _, _) = enc.tubes[0], TUBES[0]
    clip = video[:1, :kt, :, :ky, :kx].permute(0, 2, 1, 3, 4)  # b c t h w
    want = (conv.weight * clip).sum(dim=(1, 2, 3, 4)) + conv.bias
    got = pre_blocks(enc, video[:1])[0, 32] - enc.tube_fixed[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_video_model_saves_and_reloads_with_its_encoder_passed_again(tmp_path):
    model = MaMMUT(dim=32, num_tokens=50, depth=2, heads=2, dim_head=16, img_encoder=encoder(), image_dim=48).eval()
    with torch.no_grad():
        model.img_encoder.fixed_gate.fill_(0.3)
    model.save_pretrained(tmp_path / "m")
    loaded = MaMMUT.from_pretrained(tmp_path / "m", img_encoder=encoder()).eval()
    assert loaded.img_encoder.fixed_gate.item() == pytest.approx(0.3)
    text, video = torch.randint(2, 50, (2, 6)), torch.randn(2, 8, 3, 32, 32)
    torch.testing.assert_close(loaded(text, video), model(text, video))


@pytest.mark.parametrize("option, absent, present", [
    ({"gate": False}, "fixed_gate", "tubes.0.weight"),
    ({"fixed_embeddings": False}, "fixed_gate", "tube_pos"),
    ({"use_tubes": False}, "tubes.0.weight", "fixed_gate"),
])
def test_the_papers_ablations_are_named_options(option, absent, present, tmp_path):
    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=8, dim=48, depth=2, heads=2, dim_head=16)
    enc = VideoTubeViT(vit, VideoTubeConfig(frames=8, frame_stride=4, tubes=TUBES, **option))
    params = dict(enc.named_parameters())
    assert absent not in params and present in params
    video = torch.randn(2, 8, 3, 32, 32)
    x = pre_blocks(enc, video)
    assert enc(video).shape == (2, enc.num_tokens(), 48)
    full = encoder()
    want = vit.to_patches(video[:, 0]).flatten(2).transpose(1, 2) + vit.pos_emb.flatten(2).transpose(1, 2)
    if option == {"gate": False}:  # the fixed embeddings at weight 1 from the start
        torch.testing.assert_close(x[:, :16], want + full.patch_fixed[:16])
    elif option == {"fixed_embeddings": False}:  # no sin-cos: tube tokens carry only the learned positions (zero)
        torch.testing.assert_close(x[:, :16], want)
        assert enc.num_tokens() == full.num_tokens() and not enc.tube_fixed.any()
    else:  # frames only: the 2 sampled frames' patches, no tube tokens
        assert enc.num_tokens() == 32 and x.shape[1] == 32
    assert "ablations" in repr(enc)
    model = MaMMUT(dim=32, num_tokens=50, depth=2, heads=2, dim_head=16, bos_id=1,
                   encoder={"type": "video_tube", "vit": dict(image_size=32, patch_size=8, dim=48, depth=2, heads=2,
                                                              dim_head=16), "frames": 8, "frame_stride": 4,
                            "tubes": TUBES, **option})
    model.save_pretrained(tmp_path / "m")
    loaded = MaMMUT.from_pretrained(tmp_path / "m").eval()
    for k, v in option.items():
        assert getattr(loaded.img_encoder.config, k) == v
    text = torch.randint(2, 50, (2, 6))
    torch.testing.assert_close(loaded(text, video), model.eval()(text, video))


def test_the_gate_can_start_open():
    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=8, dim=48, depth=2, heads=2, dim_head=16)
    enc = VideoTubeViT(vit, VideoTubeConfig(frames=8, frame_stride=4, tubes=TUBES, gate_init=1.0))
    assert isinstance(enc.fixed_gate, torch.nn.Parameter) and enc.fixed_gate.item() == 1.0
    video = torch.randn(1, 8, 3, 32, 32)
    want = vit.to_patches(video[:, 0]).flatten(2).transpose(1, 2) + vit.pos_emb.flatten(2).transpose(1, 2)
    torch.testing.assert_close(pre_blocks(enc, video)[:, :16], want + enc.patch_fixed[:16])
