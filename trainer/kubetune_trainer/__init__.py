"""kubetune's trainer: the stages (prepare, train, evaluate, report) and local mode.

It imports the core package :mod:`kubetune` (schema, contract, layout, results,
storage) and never the operator. Importing this package, :mod:`.context`,
:mod:`.stages` or :mod:`.local` does not import torch; the stage modules
(:mod:`.prepare`, :mod:`.train`, :mod:`.evaluate`, :mod:`.report`) do when they run.
Each stage is a function ``run(ctx) -> <Stage>Result`` called by local mode
(``kubetune run``) and by pods (``kubetune <stage>``) alike, through
:func:`kubetune_trainer.stages.run_stage`.
"""
