"""VocabularyIndex: a vocabulary of class names (with aliases) embedded by a model's text tower and indexed by faiss.

    index = VocabularyIndex.build(model, ["cat", "dog"] or {"tv": ["television", "monitor"]} or "imagenet21k")
    scores, classes = index.search(embeddings, k=5)     # top-k classes per query: never the whole vocabulary
    index.save("vocab/"); VocabularyIndex.load("vocab/", model)   # refuses a model with another text side

Each name is embedded with prompt templates, averaged and L2-normalised (CLIP's prompt ensembling); optionally a
fixed reference is subtracted first (see ``center`` and ``reference``: the training captions' mean embedding,
``ViLSeg.fit_text_reference``, or the templates' own embedding), so that a class's score never depends on the other
classes asked. A class scores the best of its names. The index is exact
inner product below ``APPROXIMATE_FROM`` names and HNSW from there (measured in benchmarks/segment.py: HNSW
with ``HNSW_EF_SEARCH`` keeps recall@1 >= 0.99 at a fraction of the exact search's cost); on a machine with
faiss-gpu and CUDA the exact index lives on the GPU (faiss-gpu returns at most 2048 neighbours, so k is capped there).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture with a {}.")
APPROXIMATE_FROM = 5_000  # names (vectors); from here HNSW is 3x faster than exact search (benchmarks/segment.py)
HNSW_EF_SEARCH = 64  # the smallest efSearch with recall@1 >= 0.99 against exact search at 1k-100k names
GPU_MAX_K = 2048  # faiss-gpu's limit on k
# What centring subtracts from every name's embedding (see VocabularyIndex.build): "captions", the model's stored mean
# embedding of its training captions; "prompt", the templates around PROMPT_WORD, the part every templated name shares.
REFERENCES = ("captions", "prompt")
PROMPT_WORD = "thing"
INDEX_FILE, META_FILE, VECTORS_FILE = "index.faiss", "vocabulary.json", "vectors.npy"


def text_identity(model) -> str:
    """A fingerprint of everything that maps a name to its embedding: the text tower's weights, the text projection
    and the tokenizer settings, and the text reference that centring subtracts. An index built with one text side
    refuses to load with another."""
    from ..models.text_encoder import weights_identity

    identity = weights_identity(model, ("text_encoder.", "text_proj."))
    reference = getattr(model, "text_reference", None)
    if reference is None:
        return identity
    digest = hashlib.sha256(identity.encode())
    digest.update(reference.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def normalise_vocabulary(vocabulary) -> dict[str, list[str]]:
    """list of names, or mapping name -> aliases, or a packaged vocabulary's name -> {name: [aliases]}.

    Raises:
        ValueError: an empty vocabulary, or an empty name (naming it).
    """
    if isinstance(vocabulary, str):
        from .vocabularies import load_vocabulary

        vocabulary = load_vocabulary(vocabulary)
    if isinstance(vocabulary, dict):
        out = {str(k): [str(a) for a in (v if isinstance(v, (list, tuple)) else [v])] for k, v in vocabulary.items()}
    else:
        out = {str(n): [str(n)] for n in vocabulary}
    if not out:
        raise ValueError("the vocabulary is empty: give at least one class name")
    for name, aliases in out.items():
        if not name.strip() or not aliases or not all(a.strip() for a in aliases):
            raise ValueError(f"the vocabulary has an empty class name or alias: {name!r} -> {aliases!r}")
    return out


def text_reference(model, reference: str, templates=DEFAULT_TEMPLATES) -> torch.Tensor | None:
    """[E] vector that centring subtracts (CPU, float): ``"captions"``, the model's ``text_reference`` (None for a
    model without one: a bare CLIP, an export from before it existed); ``"prompt"``, the templates' embedding of
    :data:`PROMPT_WORD`."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == "prompt":
        return embed_names(model, [PROMPT_WORD], templates)[0]
    mean = getattr(model, "text_reference", None)
    return None if mean is None else mean.detach().float().cpu()


@torch.inference_mode()
def embed_names(model, names: list[str], templates=DEFAULT_TEMPLATES, batch_size: int = 128,
                progress: bool | None = False) -> torch.Tensor:
    """[N, E]: every name embedded with every template in batches, averaged over templates, L2-normalised.

    Prompts are batched in order of length, so that a batch pads to similar lengths (the tokenizer pads to the
    longest prompt of its batch: ImageNet-21k's names run from 1 to 20 words), and put back in order after.
    ``progress``: a progress bar (None: only on a terminal)."""
    from tqdm.auto import tqdm

    device = model.logit_scale.device
    prompts = [t.format(n) for n in names for t in templates]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = None
    bar = tqdm(total=len(names), desc="embedding names", unit="name", disable=progress is False or len(names) < 2000,
               mininterval=1)
    for i in range(0, len(prompts), batch_size):
        chunk = order[i:i + batch_size]
        emb = model.encode_texts([prompts[j] for j in chunk]).float().cpu()
        out = emb.new_empty(len(prompts), emb.shape[1]) if out is None else out
        out[chunk] = emb
        bar.update(len(chunk) / len(templates))
    bar.close()
    emb = out.to(device).view(len(names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).cpu()


CACHE_FROM = 1000  # names: smaller vocabularies embed in a second or two and are not cached


def cache_folder() -> Path:
    """Where embedded vocabularies are kept: ``$XDG_CACHE_HOME/vilseg/vocab`` (default ``~/.cache/vilseg/vocab``)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vilseg" / "vocab"


def cached_index(model, vocabulary, templates=DEFAULT_TEMPLATES, center: bool = True, kind: str = "auto",
                 progress: bool | None = None, reference: str = "captions") -> "VocabularyIndex":
    """:meth:`VocabularyIndex.build`, through a cache shared by ``vilseg segment``, ``vilseg index build`` and the web
    demo: keyed by the text side's identity (:func:`text_identity`), the names with their aliases, the templates and
    the centring with its reference, so that a vocabulary of ``CACHE_FROM`` names or more is embedded once per text encoder (ImageNet-21k:
    minutes the first time, a second after). The cache is a folder per key under :func:`cache_folder`, written to a
    temporary folder and renamed, so an interrupted write leaves no half entry."""
    import os
    import shutil
    import tempfile

    names = normalise_vocabulary(vocabulary)
    key = hashlib.sha256(json.dumps([text_identity(model), names, list(templates), reference if center else None],
                                    sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_folder() / key
    if (folder / META_FILE).is_file() and (folder / VECTORS_FILE).is_file():
        return VocabularyIndex.load(folder, model, kind=kind)
    index = VocabularyIndex.build(model, names, templates, center=center, kind=kind, progress=progress,
                                  reference=reference)
    if sum(len(a) for a in names.values()) >= CACHE_FROM:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        index.save(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return index


class VocabularyIndex:
    """Template-averaged text embeddings of a vocabulary in a faiss inner-product index.

    Args:
        vectors: [T, E] L2-normalised embeddings, one per name (aliases included).
        owner: [T] class index of every vector.
        classes: class names, index = class id.
        identity: :func:`text_identity` of the model that embedded them.
        kind: "flat" (exact), "hnsw" (approximate) or "auto" (HNSW from ``APPROXIMATE_FROM`` vectors).
        center: the vector that centring subtracted (stored so queries can be compared; None if not centred).
        reference: which one it is (:data:`REFERENCES`; None if not centred).
    """

    def __init__(self, vectors: torch.Tensor, owner: torch.Tensor, classes: list[str], identity: str = "",
                 kind: str = "auto", center: torch.Tensor | None = None, aliases: dict | None = None,
                 reference: str | None = None):
        import faiss

        if kind not in ("auto", "flat", "hnsw"):
            raise ValueError(f"index kind must be 'auto', 'flat' or 'hnsw', got {kind!r}")
        self.vectors = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
        self.owner = owner.detach().cpu().long()
        self.classes, self.identity = list(classes), identity
        self.aliases = aliases or {c: [c] for c in self.classes}
        self.center, self.reference = center, (reference if center is not None else None)
        self.kind = ("hnsw" if len(self.vectors) >= APPROXIMATE_FROM else "flat") if kind == "auto" else kind
        self.max_aliases = int(torch.bincount(self.owner).max()) if len(self.owner) else 1
        dim = self.vectors.shape[1]
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            index = faiss.IndexFlatIP(dim)
        self.on_gpu = False
        if self.kind == "flat" and hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, torch.cuda.current_device(), index)
            self.on_gpu = True
        index.add(self.vectors)
        self.index = index

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def build(cls, model, vocabulary, templates=DEFAULT_TEMPLATES, center: bool = True, kind: str = "auto",
              batch_size: int = 128, progress: bool | None = False, reference: str = "captions") -> "VocabularyIndex":
        """Embeds a vocabulary with ``model``'s text side.

        Args:
            model: a :class:`~vilseg.ViLSeg`.
            vocabulary: names, or mapping name -> aliases, or a packaged vocabulary's name (``vilseg.inference.
                vocabularies.list_vocabularies()``).
            templates: prompt templates, each with one ``{}``.
            center: subtract a fixed reference (``reference``) before normalising: text embeddings share a large
                common component (template, wording), and regions no caption describes drift towards it; centring
                removes it so that they score near 0 for every name. The reference does not depend on the
                vocabulary, so a class's score is the same in every list.
            reference: ``"captions"``, the model's text reference (``model.text_reference``, the training captions'
                mean embedding, fixed with the model; a model without one, a bare CLIP or an export from before it
                existed, is not centred), or ``"prompt"``, the templates' embedding of :data:`PROMPT_WORD`. Each
                naming strategy has its own (:func:`vilseg.inference.segmenter.default_reference`): a re-encoded
                segment is a whole image, which training matched with whole captions; a pooled or masked-attention
                segment embedding is not, and against the captions' mean its scores no longer separate objects
                from background (docs/results.md, section 2).
            kind: index kind (see the class).
            batch_size: prompts per text-tower call.
            progress: a progress bar while embedding (None: only on a terminal).
        """
        aliases = normalise_vocabulary(vocabulary)
        names = [a for group in aliases.values() for a in group]
        owner = torch.tensor([i for i, group in enumerate(aliases.values()) for _ in group])
        vectors = embed_names(model, names, templates, batch_size, progress)
        mean = text_reference(model, reference, templates) if center else None
        if mean is not None:
            vectors = F.normalize(vectors - mean.to(vectors), dim=-1)
        return cls(vectors, owner, list(aliases), text_identity(model), kind, mean, aliases, reference)

    def search(self, queries: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` classes for each query (a class scores the best of its names).

        Args:
            queries: [n, E] L2-normalised embeddings (patches, segments).
            k: classes per query (at most the vocabulary's size).

        Returns:
            ([n, k] cosine scores, descending; [n, k] class ids), on the queries' device.
        """
        k = max(1, min(int(k), len(self.classes)))
        x = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if len(x) == 0:
            empty = torch.empty(0, k)
            return empty.to(queries.device), empty.long().to(queries.device)
        wanted = min(len(self.vectors), k * self.max_aliases)  # enough vectors to cover k classes
        if self.on_gpu:
            wanted = min(wanted, GPU_MAX_K)
        sims, ids = self.index.search(x, wanted)
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        valid = ids >= 0
        owners = torch.where(valid, self.owner[ids.clamp_min(0)], -1)
        # a class scores its best name: keep each class's first (= best) hit per row, then the first k of those
        earlier = torch.ones(owners.shape[1], owners.shape[1], dtype=torch.bool).tril(-1)  # [W, W]: j < i
        repeated = ((owners[:, :, None] == owners[:, None, :]) & earlier).any(2)
        first = valid & ~repeated
        rank = first.long().cumsum(1) - 1
        take = first & (rank < k)
        out_s = torch.full((len(x), k), -2.0)
        out_c = torch.zeros((len(x), k), dtype=torch.long)
        rows = torch.arange(len(x))[:, None].expand_as(take)
        out_s[rows[take], rank[take]] = sims[take]
        out_c[rows[take], rank[take]] = owners[take]
        return out_s.to(queries.device), out_c.to(queries.device)

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """[n, E] -> [n, C] scores of every class (the best of its names), exactly, by one matrix product. For the
        small vocabularies of benchmarks and evaluation, where every class's score is wanted; large vocabularies
        use :meth:`search`."""
        sims = queries.detach().float().cpu() @ torch.from_numpy(self.vectors).t()  # [n, T]
        out = torch.full((len(queries), len(self.classes)), -2.0)
        out.scatter_reduce_(1, self.owner.expand(len(queries), -1), sims, reduce="amax")
        return out.to(queries.device)

    def save(self, directory: str | Path) -> Path:
        """Writes the vectors (.npy, no pickle), the class list with aliases, and the text identity."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / VECTORS_FILE, self.vectors, allow_pickle=False)
        meta = {"classes": self.classes, "aliases": self.aliases, "owner": self.owner.tolist(),
                "identity": self.identity, "kind": self.kind,
                "center": None if self.center is None else self.center.tolist(), "reference": self.reference}
        (directory / META_FILE).write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None, kind: str | None = None) -> "VocabularyIndex":
        """Reads an index written by :meth:`save`; with ``model``, refuses it if another text side built it.
        ``kind`` rebuilds the faiss index of another kind from the stored vectors (default: the saved kind)."""
        directory = Path(directory)
        for name in (META_FILE, VECTORS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a vilseg vocabulary index")
        meta = json.loads((directory / META_FILE).read_text())
        if model is not None and meta["identity"] != text_identity(model):
            raise ValueError(f"the vocabulary index {directory} was built with another text encoder (identity "
                             f"{meta['identity']}, this model's is {text_identity(model)}): rebuild it with "
                             f"`vilseg index build`")
        vectors = torch.from_numpy(np.load(directory / VECTORS_FILE, allow_pickle=False))
        center = None if meta["center"] is None else torch.tensor(meta["center"])
        reference = meta.get("reference", "captions")  # indexes saved before "prompt" existed were caption-centred
        return cls(vectors, torch.tensor(meta["owner"]), meta["classes"], meta["identity"], kind or meta["kind"],
                   center, meta["aliases"], reference)
