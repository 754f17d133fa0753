"""Tiny Flamingo on an interleaved image-text task: name the colour of the latest image.

Rows read ``<bos> <img> red <img> blue <img> green`` with one to three solid-colour 8x8
images (plus noise); the loss is only on the colour words (media and pad tokens are never
targets). Two stages, as in the paper:

1. LM pretraining on text only (``model(text)``): the LM learns the format but can only
   guess the colours (chance: 1/5);
2. Flamingo stage: ``freeze_for_flamingo()`` and train only the perceiver and the gated
   cross-attention blocks with the images; the image encoder (a random ViT) stays frozen.

Run: ``python examples/flamingo_colours.py`` (about half a minute on one CPU core).
"""

from __future__ import annotations

import argparse

import torch

from mammut.models.flamingo import FlamingoPaLM

PAD, BOS, MEDIA, FIRST_COLOUR = 0, 1, 3, 4
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0)}
RGB = torch.tensor(list(COLOURS.values()))


def batch(b: int, t: int = 3, generator: torch.Generator | None = None):
    """text ``(b, 1 + 2t)``, images ``(b, t, 3, 8, 8)``, time_mask ``(b, t)``."""
    colours = torch.randint(len(RGB), (b, t), generator=generator)
    count = torch.randint(1, t + 1, (b,), generator=generator)
    time_mask = torch.arange(t) < count[:, None]
    images = RGB[colours][..., None, None].expand(b, t, 3, 8, 8).clone()
    images += 0.1 * torch.randn(images.shape, generator=generator)
    text = torch.full((b, 1 + 2 * t), PAD)
    text[:, 0] = BOS
    text[:, 1::2] = torch.where(time_mask, MEDIA, PAD)
    text[:, 2::2] = torch.where(time_mask, colours + FIRST_COLOUR, PAD)
    return text, images, time_mask


@torch.no_grad()
def accuracy(model: FlamingoPaLM, with_images: bool) -> float:
    model.eval()
    text, images, time_mask = batch(1024, generator=torch.Generator().manual_seed(123))
    logits = model(text[:, :-1], images, time_mask=time_mask) if with_images else model(text[:, :-1])
    is_colour = text[:, 1:] >= FIRST_COLOUR
    model.train()
    return (logits.argmax(-1) == text[:, 1:])[is_colour].float().mean().item()


def train(model: FlamingoPaLM, steps: int, with_images: bool, lr: float = 3e-3) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        text, images, time_mask = batch(32)
        if with_images:
            loss = model(text, images, time_mask=time_mask, return_loss=True)
        else:
            loss = model(text, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-steps", type=int, default=150)
    parser.add_argument("--flamingo-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = FlamingoPaLM(
        num_tokens=FIRST_COLOUR + len(COLOURS), dim=32, depth=2, heads=2, dim_head=16, media_token_id=MEDIA,
        cross_attn_every=1, perceiver_num_latents=4, perceiver_depth=1, num_time_embeds=3,
        pad_id=PAD, bos_id=BOS, vit=dict(image_size=8, patch_size=4, dim=24, depth=1, heads=2, dim_head=12),
    )
    print(f"chance: {1 / len(COLOURS):.3f}")
    loss = train(model, args.lm_steps, with_images=False)
    print(f"stage 1, LM only ({args.lm_steps} steps, loss {loss:.3f}): colour accuracy {accuracy(model, False):.3f}")
    model.freeze_for_flamingo()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    loss = train(model, args.flamingo_steps, with_images=True)
    print(
        f"stage 2, Flamingo ({args.flamingo_steps} steps, {trainable}/{total} parameters trainable, loss {loss:.3f}): "
        f"colour accuracy {accuracy(model, True):.3f}"
    )


if __name__ == "__main__":
    main()
