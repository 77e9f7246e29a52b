"""Package data, no code: the trained toy generator that ``lrag generate --demo`` runs.

- ``toy_generator.safetensors``: the EMA weights written by ``lrag train-toy`` (default recipe, see
  docs/toy_training.md; ``lrag inspect`` describes the file);
- ``toy_generator.json``: the trainer's card for that file (its ``sha256``, step, command, validation loss).

Read them through :mod:`lrag.toy.shipped` (``shipped_generator_path()``, ``load_shipped_generator(device)``),
which checks the weights against the card's sha256. To replace them, copy both files of one training run here.

The toy retrieval embedder (docs/toy_embedder.md), not used by the demo:

- ``toy_embedder.pt``: a pooled embedder exported by ``lrag train-toy-embedder`` (``{"model", "config"}``; read
  with :func:`lrag_ext.embedder.load_embedder`, or as a ``lrag eval --grid-embedders`` path);
- ``toy_embedder.json``: its card (``sha256``, command, recipe, retrieval hit rates on validation clips).
"""
