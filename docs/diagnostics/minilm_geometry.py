"""Diagnostic: anisotropy of all-MiniLM-L6-v2 on the demo world's captions, and the synonym text ceiling.

Prints the mean cosine between caption embeddings before and after subtracting their mean, and the fraction of
synonym class names whose nearest canonical class name (4 prompt templates, vocabulary-centred) is their own.

    python docs/diagnostics/minilm_geometry.py
"""
import torch
import torch.nn.functional as F

from vilseg import create_model
from vilseg.data.synthetic import CLASSES, SyntheticWorld, synonym_name
from vilseg.inference import DEFAULT_TEMPLATES

model = create_model("vilseg-demo").eval()
tower = model.text_encoder


@torch.no_grad()
def embed(texts):
    out = []
    for i in range(0, len(texts), 256):
        tok = tower.tokenizer(texts[i:i + 256])
        out.append(F.normalize(tower(tok["input_ids"], tok["attention_mask"]), dim=-1))
    return torch.cat(out)


world = SyntheticWorld("train", seed=123)
captions = embed([world.scene(i).caption for i in range(3000)])
mean = captions.mean(0)
centred = F.normalize(captions - mean, dim=-1)
print(f"mean cosine between captions: raw {(captions @ captions.t()).mean():.3f}, "
      f"centred {(centred @ centred.t()).mean():.4f}")


def names(vocab):
    v = torch.stack([F.normalize(embed([t.format(n) for t in DEFAULT_TEMPLATES]).mean(0), dim=-1) for n in vocab])
    return F.normalize(v - v.mean(0), dim=-1)


canonical, synonyms = names(list(CLASSES)), names([synonym_name(c) for c in CLASSES])
top1 = ((synonyms @ canonical.t()).argmax(1) == torch.arange(len(CLASSES))).float().mean()
print(f"synonym text ceiling (raw MiniLM space): {100 * top1:.1f}%")
