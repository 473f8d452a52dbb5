"""Tiny CLIP-family model folders for tests (no hub): random CLIP / SigLIP, and a CLIP trained on shapes.

Each folder is what ``save_pretrained`` writes for a hub model: the model, its image processor and a
tokenizer (a word-level ``tokenizers`` vocabulary wrapped in ``PreTrainedTokenizerFast``), so it loads
through the same ``from_pretrained`` path as a hub id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ["a", "photo", "of", "cat", "dress", "shape", *COLOURS, *SHAPES]
PAD, UNK, BOS, EOS = 0, 1, 2, 3  # EOS is not 2: CLIP's legacy pooling takes the argmax id when it is


def save_tokenizer(folder: Path, length: int, *, mask: bool = True) -> None:
    """A lower-casing word-level tokenizer over :data:`WORDS`, ``<bos> words <eos>``; ``mask=False``
    gives only ``input_ids`` (as SigLIP's own tokenizer does)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<unk>": UNK, "<bos>": BOS, "<eos>": EOS}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                        special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    names = ["input_ids", "attention_mask"] if mask else ["input_ids"]
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>", model_max_length=length, model_input_names=names
                            ).save_pretrained(folder)


def clip_config(length: int = 8, image: int = 32, projection: int = 16):
    from transformers import CLIPConfig

    text = {"vocab_size": len(WORDS) + 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": length, "pad_token_id": PAD,
            "bos_token_id": BOS, "eos_token_id": EOS}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-initialised tiny CLIP (16-d embeddings, 32 px images, 8 tokens) as a model folder."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    CLIPModel(clip_config()).eval().save_pretrained(folder)
    _clip_processor().save_pretrained(folder)
    save_tokenizer(folder, 8)
    return folder


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A random-initialised tiny SigLIP (32-d, 32 px images, 8 tokens, no attention mask) as a model folder."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    text = {"vocab_size": len(WORDS) + 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 8, "pad_token_id": PAD,
            "bos_token_id": BOS, "eos_token_id": EOS}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    save_tokenizer(folder, 8, mask=False)
    return folder


def shape_picture(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One ``colour`` ``shape`` at a random place and size on a random light-grey background."""
    grey = int(rng.integers(170, 250))
    picture = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(picture)
    side = int(rng.integers(size // 3, size * 3 // 4))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return picture


def write_shapes(folder: Path, per_kind: int = 2, seed: int = 100) -> dict[str, tuple[str, str]]:
    """A gallery of every colour x shape, ``per_kind`` each: ``{file name: (colour, shape)}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for colour in COLOURS:
        for shape in SHAPES:
            for n in range(per_kind):
                name = f"{colour}-{shape}-{n}.png"
                shape_picture(colour, shape, rng).save(folder / name)
                kinds[name] = (colour, shape)
    return kinds


def train_shapes_clip(folder: Path, steps: int = 300, seed: int = 0) -> Path:
    """A tiny CLIP trained contrastively on coloured shapes and their captions ("a red circle", "red",
    "square", ...), saved as a model folder.

    Each batch holds every colour x shape once; a caption is a positive for every picture it describes
    (soft targets over its matches), so colour-only and shape-only words are learned too.
    """
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CLIPModel(clip_config()).train()
    processor = _clip_processor()
    save_tokenizer(folder, 8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    pool = 8  # pictures of each kind, drawn once and reused
    pictures = [shape_picture(c, s, rng) for _ in range(pool) for c, s in kinds]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"].view(pool, len(kinds), 3, 32, 32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is many times faster on a busy machine
    try:
        _train(model, optimiser, tokenizer, pixels, kinds, steps, rng)
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _train(model, optimiser, tokenizer, pixels, kinds, steps: int, rng: np.random.Generator) -> None:
    import torch
    import torch.nn.functional as F

    pool = pixels.shape[0]
    for _ in range(steps):
        captions, described = [], []
        for colour, shape in kinds:
            form = rng.integers(4)
            captions.append([f"a {colour} {shape}", colour, shape, f"{colour} {shape}"][form])
            described.append((colour if form != 2 else None, shape if form != 1 else None))
        batch = pixels[torch.from_numpy(rng.integers(0, pool, len(kinds))), torch.arange(len(kinds))]
        tokens = tokenizer(captions, padding="max_length", max_length=8, return_tensors="pt")
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=batch)
        match = torch.tensor([[float((c is None or c == kc) and (s is None or s == ks)) for c, s in described]
                              for kc, ks in kinds])  # (pictures, captions)
        logits = out.logits_per_image
        loss = (-(F.log_softmax(logits, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
                - (F.log_softmax(logits, 0) * match / match.sum(0, keepdim=True)).sum(0).mean()) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
