"""The web demo: `vilseg web --model DIR` (Gradio; installed by the `web` extra).

Upload an image, type classes (or pick a packaged vocabulary) and see the overlay with its legend and a table of the
segments. Examples from the synthetic world are included. Runs on 127.0.0.1 by default; nothing is fetched from the
internet (no analytics, system fonts only).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CLASSES_HINT = "comma-separated; aliases with |, e.g. tv|television, cat"
NO_VOCAB = "(the classes above)"
CONCURRENCY = 8  # requests segmented at once (Gradio's default is 1: one request at a time)
EXAMPLE_CLASSES = "red circle, green square, blue triangle, yellow cross, red square, blue circle"


def example_images(folder: Path, n: int = 3) -> list[str]:
    """A few scenes of the synthetic world's evaluation split, written as PNGs (a demo model knows these)."""
    from PIL import Image

    from .data.synthetic import SyntheticWorld

    folder.mkdir(parents=True, exist_ok=True)
    world = SyntheticWorld("eval", image_size=256, seed=1)
    paths = []
    for i in range(n):
        path = folder / f"synthetic_{i}.png"
        if not path.is_file():
            Image.fromarray(world.scene(i).image).save(path)
        paths.append(str(path))
    return paths


def build_app(segmenter, source: str | Path):
    """The Gradio Blocks app for ``segmenter`` (its read-out is the default); ``source`` names the model (a folder, or
    an open_clip CLIP) on the page."""
    import gradio as gr

    from .inference.vocabularies import list_vocabularies

    model, readout = segmenter.model, segmenter.readout
    indexes: dict = {}

    def index_for(classes: str, vocabulary: str):
        """The request's vocabulary index, built once per distinct vocabulary (the shared cache is read-mostly:
        two requests that build the same one at once both build it, and either result is right)."""
        if vocabulary and vocabulary != NO_VOCAB:
            key, names = vocabulary, vocabulary
        else:
            from .inference.vocabularies import parse_classes

            names = parse_classes((classes or "").split(","), "classes")
            if not names:
                raise gr.Error("type at least one class, or pick a vocabulary")
            key = repr(sorted(names.items()))
        if key not in indexes:
            from .inference.vocabulary import cached_index, normalise_vocabulary

            names = normalise_vocabulary(names)
            for word in readout.background_words:
                names.setdefault(word, [word])
            indexes[key] = cached_index(model, names, segmenter.templates, center=segmenter.center,
                                        reference=segmenter.reference)
        return indexes[key]

    def run(image, classes: str, vocabulary: str, threshold: float):
        if image is None:
            raise gr.Error("upload an image first")
        # everything this request sets travels with the call: the shared segmenter is never changed, so
        # concurrent requests with their own classes and thresholds do not see each other's
        index = index_for(classes, vocabulary)
        result = segmenter.segment(image, index=index, threshold=threshold)
        out = Path(tempfile.mkdtemp(prefix="vilseg-web-")) / "overlay.png"
        segmenter.render_overlay(image, result, out)
        rows = [[s["id"], s["label"], round(s["score"], 3), s["area"], str(s["box"]),
                 ", ".join(n for n, _ in s["top"][:3])] for s in sorted(result.segments, key=lambda s: -s["area"])]
        return str(out), rows

    with gr.Blocks(title="vilseg", analytics_enabled=False) as app:
        from .inference.segmenter import training_notice

        notice = training_notice(source) if Path(source).is_dir() else None
        gr.Markdown("# vilseg: open-vocabulary segmentation\nA model trained on image-caption pairs alone names "
                    f"the segments of any image with your words. Model: `{source}`"
                    + (f"\n\n**{notice[0].upper() + notice[1:]}**" if notice else ""))
        with gr.Row():
            image = gr.Image(type="pil", label="image", elem_id="input-image")
            with gr.Column():
                classes = gr.Textbox(label=f"classes ({CLASSES_HINT})", value=EXAMPLE_CLASSES, elem_id="classes")
                vocabulary = gr.Dropdown([NO_VOCAB, *list_vocabularies()], value=NO_VOCAB,
                                         label="or a vocabulary (names every segment)")
                # a read-out without a threshold (a CLIP's) starts at the slider's floor: no segment is background
                threshold = gr.Slider(-1.0, 0.9, value=readout.threshold if readout.threshold is not None else -1.0,
                                      step=0.01, label="background threshold (cosine; -1: none)")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
        overlay = gr.Image(label="image | segmentation, with legend", elem_id="overlay", type="filepath")
        table = gr.Dataframe(headers=["segment", "label", "score", "area (px)", "box", "best names"],
                             label="segments", elem_id="segments")
        gr.Examples([[p, EXAMPLE_CLASSES] for p in example_images(Path(tempfile.gettempdir()) / "vilseg-examples")],
                    inputs=[image, classes])
        button.click(run, [image, classes, vocabulary, threshold], [overlay, table], api_name="segment",
                     concurrency_limit=CONCURRENCY)
    return app


def launch(segmenter, source: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serves the app for a :class:`~vilseg.inference.Segmenter` at http://host:port; returns it (with
    ``block=False`` the server runs in a thread)."""
    import gradio as gr

    app = build_app(segmenter, source)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # system fonts: no download
                              font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True,
               inbrowser=False, theme=theme)
    return app
