"""kubetune's trainer package: the FineTuneJob schema, storage, and the stages.

Importing this package (or ``schema``, ``results``, ``layout``, ``storage``,
``context``, ``stages``) never imports torch or kopf: the operator image uses
them without either. Stage modules (``prepare``, ``train``, ``evaluate``,
``report``) import torch when they run.
"""

__version__ = "0.1.0"
