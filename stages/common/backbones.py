"""What the metric backbones compute, batch by batch: Inception features (clean-fid's "clean"
resize), LPIPS distances of pairs, CLIP image-prompt cosines and image embeddings."""

from __future__ import annotations

import numpy as np
import torch

from stages.common.io import load_rgb


def inception_features(files, model, dev, batch_size: int) -> np.ndarray:
    from cleanfid.fid import get_files_features

    # num_workers=0: clean-fid's default of 12 workers breaks on Docker's 64 MB /dev/shm.
    return get_files_features([str(f) for f in files], model, num_workers=0, batch_size=batch_size, device=dev,
                              mode="clean", verbose=False)


def _batches(items, size):
    return (items[i:i + size] for i in range(0, len(items), size))


def _to_tensor(images, dev) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1


@torch.no_grad()
def lpips_scores(model, gt_files, gen_files, dev, batch_size: int) -> np.ndarray:
    scores = []
    for pairs in _batches(list(zip(gt_files, gen_files, strict=True)), batch_size):
        gt = _to_tensor([load_rgb(g) for g, _ in pairs], dev)
        gen = _to_tensor([load_rgb(p) for _, p in pairs], dev)
        scores.append(model(gt, gen).flatten().cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def clip_embeddings(model, processor, files, prompts, dev, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's cosine to its prompt, and the image embeddings (CMMD's features)."""
    cosines, embeddings = [], []
    for chunk in _batches(list(zip(files, prompts, strict=True)), batch_size):
        text = processor.tokenizer([p for _, p in chunk], padding=True, truncation=True, max_length=77,
                                   return_tensors="pt").to(dev)
        pixels = processor.image_processor([load_rgb(f) for f, _ in chunk], return_tensors="pt").to(dev)
        image_embeds = model.get_image_features(**pixels)
        text_embeds = model.get_text_features(**text)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        cosines.append(torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1).float().cpu().numpy())
        embeddings.append(image_embeds.double().cpu().numpy())
    return np.concatenate(cosines), np.concatenate(embeddings)
