"""The training machinery behind ``vilseg/train.py``: the layered config and its schema (``config``), atomic
checkpoints (``checkpoint``), the stage loader that starts one stage from another's export (``stage``), the cache of a
frozen text tower's features (``text_cache``) and the distributed helpers the losses and objectives gather with
(``distributed``). ``accelerate launch vilseg/train.py`` stays the training command."""
