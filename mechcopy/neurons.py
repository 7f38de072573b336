"""`NeuronSet`, the name a set of neurons had before components had kinds: `mechcopy.components.Components`
(whose default kind is the neuron), kept so that code and notebooks written with it keep working.
The model fingerprint it is checked against lives in `mechcopy.fingerprint`."""

from __future__ import annotations

from mechcopy.components import Components
from mechcopy.fingerprint import IDENTITY_KEYS, model_fingerprint, weight_hash

NeuronSet = Components

__all__ = ["NeuronSet", "IDENTITY_KEYS", "model_fingerprint", "weight_hash"]
